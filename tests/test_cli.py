"""The genfast command: info, check and bench."""

import importlib
import json

import pytest

from genfast import _backend
from genfast.cli import main
from conftest import one_call_time_ms


def test_info(capsys):
    assert main(["info"]) == 0
    assert "genfast" in capsys.readouterr().out


def test_check_passes_and_names_each_backend(capsys):
    assert main(["check", "--device", "cpu", "--ops", "denoise_step"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out
    if _backend.native_runs_on("cpu"):
        assert " native " in out


def test_check_covers_nade_and_made(capsys):
    assert main(["check", "--device", "cpu", "--ops", "nade"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out
    for case in ("nade relu per sample", "nade_sample sigmoid", "made_linear strict"):
        assert case in out or not _backend.native_runs_on("cpu")


def test_check_fails_on_a_wrong_kernel(capsys, monkeypatch):
    from genfast.ops import denoise_step as denoise_op

    original = denoise_op.run

    def off_by_a_little(impl, *args):
        original(impl, *args)
        args[-2].add_(1e-2)  # out

    monkeypatch.setattr(denoise_op, "run", off_by_a_little)
    assert main(["check", "--device", "cpu"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_check_runs_no_attention_call_a_backend_cannot_take(capsys, monkeypatch):
    """The CUDA kernels take no float32 (`genfast check` on a GPU raised at the first such call): the
    combinations left out are never run."""
    import torch

    from genfast.testing import attention as attention_samples
    from genfast.testing import check

    def refuse(impl, *args, **kwargs):
        raise TypeError("this backend cannot take the call")

    cases = attention_samples.cases
    monkeypatch.setattr(attention_samples, "cases", lambda device, dtypes: (
        (name, dtype, run if dtype == torch.float16 else refuse, outputs)
        for name, dtype, run, outputs in cases(device, dtypes)))
    runnable = check._runnable
    monkeypatch.setattr(check, "_attention_runs",
                        lambda impl, device, dtype: dtype == torch.float16 and runnable(impl, device, dtype))
    rows = list(check.check_attention("cpu"))
    assert rows and all(dtype == torch.float16 and passed for _, _, dtype, _, passed, _ in rows)


def test_unknown_op_is_an_error(capsys):
    assert main(["check", "--ops", "nope"]) == 2
    assert main(["bench", "--ops", "nope"]) == 2


@pytest.mark.slow
def test_bench_writes_json_and_csv(tmp_path, capsys, monkeypatch):
    """Every op's benchmark, each candidate called once and timed at 2 ms: what the files hold."""
    from genfast.benchmarks import compute, timing

    for module in (compute, timing):
        monkeypatch.setattr(module, "time_ms", one_call_time_ms)
    monkeypatch.setitem(timing.COPY_NUMEL, "cpu", 1 << 16)
    monkeypatch.setitem(compute.GEMM_SIZE, "cpu", 256)
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["bench", "--device", "cpu", "--quick", "--sizes", "65536", "--json", str(json_path),
                 "--csv", str(csv_path)]) == 0
    result = json.loads(json_path.read_text())
    assert result["machine"]["torch"] and result["rows"] and result["complete"]
    impls = {row["impl"] for row in result["rows"]}
    assert {"eager torch", "torch.compile"} <= impls
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert csv_path.read_text().count("\n") == len(result["rows"]) + 1
    assert "x genfast" in capsys.readouterr().out


def test_bench_streams_each_group_as_it_is_measured(capsys, monkeypatch):
    """--stream (scripts/gpu-check's logs): each row printed as its group is timed, before the
    table, and no progress bar; a run stopped part way keeps the rows measured so far."""
    from genfast.benchmarks import timing

    monkeypatch.setattr(timing, "time_ms", one_call_time_ms)
    monkeypatch.setitem(timing.COPY_NUMEL, "cpu", 1 << 16)
    assert main(["bench", "--device", "cpu", "--quick", "--ops", "denoise_step", "--sizes", "65536",
                 "--stream"]) == 0
    captured = capsys.readouterr()
    assert "\r[" not in captured.err
    streamed, table = captured.out.split("genfast bench on")
    rows = [line for line in table.splitlines() if line.endswith("x") and " genfast " in f" {line} "]
    assert len(rows) > 1 and all(line in streamed.splitlines() for line in rows)


def test_bench_files_hold_the_groups_measured_before_a_stop(tmp_path, monkeypatch):
    """A run stopped part way (a time limit) leaves JSON and CSV files of every group measured until
    then, the JSON marked incomplete."""
    from genfast.benchmarks import registry, timing

    monkeypatch.setattr(timing, "time_ms", one_call_time_ms)
    monkeypatch.setitem(timing.COPY_NUMEL, "cpu", 1 << 16)
    real = registry.BENCHMARKS["denoise_step"]

    def stopped_after_a_group(device, progress=None, **options):
        measured = progress.measured

        def then_stop(group):
            measured(group)
            raise KeyboardInterrupt

        progress.measured = then_stop
        return real(device, progress=progress, **options)

    monkeypatch.setitem(registry.BENCHMARKS, "denoise_step", stopped_after_a_group)
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--device", "cpu", "--quick", "--ops", "denoise_step", "--sizes", "65536", "--json",
              str(json_path), "--csv", str(csv_path)])
    result = json.loads(json_path.read_text())
    assert result["complete"] is False and result["rows"]
    assert all(row["op"].startswith("denoise_step") for row in result["rows"])
    assert csv_path.read_text().count("\n") == len(result["rows"]) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]


def test_a_peer_that_raises_is_left_out_and_genfasts_error_ends_the_run(capsys):
    """time_in_turns: a peer's error (another library's version) leaves it out, said on stderr; a
    genfast candidate's error is raised."""
    from genfast.benchmarks import timing

    def broken():
        raise AttributeError("no such API")

    timings = timing.time_in_turns([("peer", broken), ("genfast native", lambda: None)], "cpu", True,
                                   lambda message: None, "a label")
    assert timings[0] is None and timings[1]["median_ms"] >= 0
    assert "peer left out of a label: AttributeError: no such API" in capsys.readouterr().err
    with pytest.raises(timing.GenfastCandidateError, match="out=, genfast native, a label: AttributeError"):
        timing.time_in_turns([("out=, genfast native", broken)], "cpu", True, lambda message: None, "a label")


def test_results_name_the_commit_without_git(monkeypatch):
    """A working tree copied without .git (the device tool's) names its commit by GENFAST_GIT_SHA."""
    from genfast.benchmarks import timing

    def no_git(*args, **kwargs):
        raise OSError("no git")

    monkeypatch.setattr(timing.subprocess, "run", no_git)
    monkeypatch.delenv("GENFAST_GIT_SHA", raising=False)
    assert timing._git_sha() is None
    monkeypatch.setenv("GENFAST_GIT_SHA", "9ca057c")
    assert timing._git_sha() == "9ca057c"


def test_triton_kernels_ship_with_the_package():
    """A wheel install must carry genfast.kernels; without it every Triton test would skip silently."""
    pytest.importorskip("triton")
    module = importlib.import_module("genfast.kernels.denoise_step")
    assert hasattr(module, "launch_denoise_step")
    assert _backend.triton_error() is None
