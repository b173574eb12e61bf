"""The layout probes of genfast.testing.attention_probes (run first by the Hopper kernel's GPU
tests): they pass on the reference and on the CPU kernel, and name the queries, keys or value rows
of mistakes planted in an otherwise exact attention."""

import pytest
import torch

import genfast
from genfast.testing.attention_probes import _ranges, score_probe, value_probe


def _reference(q, k, v, scale):
    return genfast.attention(q, k, v, scale=scale, impl="reference")


def _cpu_kernel(q, k, v, scale):
    return genfast.attention(q, k, v, scale=scale, impl="native")


@pytest.mark.parametrize("fn", [_reference, _cpu_kernel], ids=["reference", "cpu-kernel"])
@pytest.mark.parametrize("probe", [score_probe, value_probe])
def test_probes_pass_on_right_kernels(probe, fn):
    assert probe(fn, torch.float32, "cpu") == ""


def test_score_probe_names_swapped_keys():
    def swapped(q, k, v, scale):  # keys 8..15 take 16..23's vectors
        k = k.clone()
        k[..., 8:16, :] = k[..., 16:24, :].clone()
        return _reference(q, k, v, scale)

    report = score_probe(swapped, torch.float32, "cpu")
    assert "queries 0-199; keys 8-15;" in report, report

    def unnormalized(q, k, v, scale):  # rows of the second tile off by a factor
        o = _reference(q, k, v, scale)
        o[..., 128:, :] *= 1.01
        return o

    report = score_probe(unnormalized, torch.float32, "cpu")
    assert report.startswith("0 of") and report.endswith("wrong scale: 128-199"), report


def test_value_probe_names_shifted_rows_and_lost_ones():
    def shifted(q, k, v, scale):  # key row j + 1 where j belongs
        return _reference(q, k.roll(1, dims=2), v, scale)

    report = value_probe(shifted, torch.float32, "cpu")
    assert report.startswith("200 of 200") and "0->1, 1->2" in report, report

    def warp_lost(q, k, v, scale):  # one warp's 16 rows of the second tile never written
        o = _reference(q, k, v, scale)
        o[..., 144:160, :] = 0
        return o

    report = value_probe(warp_lost, torch.float32, "cpu")
    assert report.startswith("16 of 200") and "queries 144-159" in report and "144->none" in report, report


def test_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges([]) == ""
    assert _ranges(list(range(0, 40, 2))).endswith("(20 ranges)")
