"""The small transformer language model on genfast.attention: fused and reference attention follow
the same loss curve on text that ships with Python (learned positions, or the rotary embedding by
genfast.rotary), training lowers the loss well below a uniform model's, and decoding with the KV
cache (bottom-right causal attention) equals recomputation."""

import copy
import math

import pytest
import torch

from genfast.models import TransformerLM
from genfast.models.data import python_text
from genfast.models.transformer import text_windows
from genfast import _backend
from conftest import fused_impls, skip_unless_supported

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches run faster on one thread

STEPS = 40


@pytest.fixture(scope="module")
def windows():
    return text_windows(python_text(), 65)


def _model(impl, kv_heads=None, **kwargs):
    torch.manual_seed(0)
    return TransformerLM(kv_heads=kv_heads, impl=impl, **kwargs)


@pytest.mark.parametrize("kv_heads, rotary", [(None, False), (2, False), (2, True)])
def test_fused_attention_trains_like_the_reference(windows, kv_heads, rotary):
    skip_unless_supported("native", "cpu")
    reference = _model("reference", kv_heads, rotary=rotary)
    fused = copy.deepcopy(reference)
    fused.impl = "native"
    expected = reference.fit(windows, steps=STEPS)
    got = fused.fit(windows, steps=STEPS)
    # The curves agree to float32 rounding until training turns chaotic (about step 28, where the
    # float32 reference's own loss starts to stray from float64's, to 4e-5 by step 39 on an Intel
    # Xeon), and to 1e-3 after.
    got, expected = torch.tensor(got), torch.tensor(expected)
    torch.testing.assert_close(got[:25], expected[:25], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[25:], expected[25:], rtol=1e-3, atol=0)
    # Bytes are 256 tokens: a uniform model's loss is log 256 = 5.55 nats.
    assert expected[0] > 5.3 and sum(got[-5:]) / 5 < 3.6 < math.log(256)


@pytest.mark.triton
def test_triton_attention_trains_like_the_reference(windows):
    small = dict(dim=32, heads=2, layers=1)
    reference = _model("reference", **small)
    fused = copy.deepcopy(reference)
    fused.impl = "triton"
    short = windows[:, :17]
    expected = reference.fit(short, steps=3, batch_size=2)
    got = fused.fit(short, steps=3, batch_size=2)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
@pytest.mark.parametrize("kv_heads, rotary", [(None, False), (1, False), (1, True)])
def test_kv_cache_decoding_equals_recomputation(windows, impl, kv_heads, rotary):
    """With rotary, the cache holds keys turned at their positions, and new queries and keys turn
    at theirs (from the cache's length)."""
    skip_unless_supported(impl, "cpu")
    model = _model("reference", kv_heads, rotary=rotary,
                   **(dict(dim=32, heads=2, layers=1) if impl == "triton" else {}))
    model.fit(windows, steps=10)  # some training, so that greedy decoding is not trivial
    model.impl = impl
    prompt = windows[:3, :12]
    steps = 6 if impl == "triton" else 24
    assert torch.equal(model.generate(prompt, steps), model.generate(prompt, steps, use_cache=False))
    with torch.no_grad():  # the cached logits of one more token against the full sequence's
        tokens = windows[:3, :20]
        _, cache = model(tokens[:, :19])
        step_logits, _ = model(tokens[:, 19:], cache)
        full_logits, _ = model(tokens)
    torch.testing.assert_close(step_logits[:, 0], full_logits[:, -1], rtol=1e-4, atol=1e-5)


def test_rotary_positions_reach_the_attention(windows):
    """The rotary model has no position embedding; its positions come only from the turn, so turning
    by nothing (cos 1, sin 0) changes its logits, and a shifted start changes them as the turn does."""
    model = _model("native" if _backend.native_runs_on("cpu") else "reference", rotary=True)
    assert model.position is None
    tokens = windows[:2, :16]
    with torch.no_grad():
        logits, _ = model(tokens)
        cos, sin = model.cos.clone(), model.sin.clone()
        model.cos.fill_(1.0)
        model.sin.zero_()
        unturned, _ = model(tokens)
        model.cos.copy_(cos)
        model.sin.copy_(sin)
    assert not torch.allclose(logits, unturned, atol=1e-3)


def test_positions_beyond_max_len_are_refused():
    model = _model("reference", max_len=16)
    with pytest.raises(ValueError, match="exceed max_len"):
        model(torch.zeros(1, 17, dtype=torch.int64))
