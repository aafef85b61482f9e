"""Batch-invariant mode (docs/batch-invariance.md) on CPU: the switch, how the op argument reaches the
implementations, and the property itself for the reference and the Triton interpreter, every scheme.

The GPU half (every scheme at T = 1 ... 4096, CUDA graphs, compile) is tests/ops/test_batch_invariance_cuda.py."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops
from torch_moe_ops.schemes import QUANT_SCHEMES
from torch_moe_ops.testing import batch_variance, experts_kwargs, quantize_experts, random_moe_weights

SCHEMES = tuple(QUANT_SCHEMES)
E, K_TOP, H, I = 6, 2, 160, 96  # E not a power of two; H, I multiples of 32 (mxfp4) but not of 128


def _experts(scheme, dtype=torch.bfloat16):
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=dtype)
    q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme)
    return q13, q2, experts_kwargs(scheme, s13, s2, block)


# ------------------------------------------------------------------------------------------ the switch
def test_switch_context_manager_and_errors():
    assert torch_moe_ops.is_batch_invariant() is False
    with torch_moe_ops.batch_invariant():
        assert torch_moe_ops.is_batch_invariant()
        with torch_moe_ops.batch_invariant(False):
            assert not torch_moe_ops.is_batch_invariant()
        assert torch_moe_ops.is_batch_invariant()
    assert not torch_moe_ops.is_batch_invariant()
    with pytest.raises(RuntimeError, match="boom"), torch_moe_ops.batch_invariant():
        raise RuntimeError("boom")
    assert not torch_moe_ops.is_batch_invariant()  # restored after the exception
    torch_moe_ops.set_batch_invariant(True)
    assert torch_moe_ops.is_batch_invariant()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        torch_moe_ops.set_batch_invariant(1)
    assert torch_moe_ops.is_batch_invariant()  # a refused value changes nothing


def test_public_functions_follow_the_switch_and_a_bool_wins(invariant_calls):
    seen = invariant_calls
    q13, q2, kw = _experts("none")
    x, logits = torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, E)
    w, ids = torch_moe_ops.topk_route(logits, K_TOP)
    torch_moe_ops.fused_experts(x, q13, q2, w, ids)
    torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP)
    with torch_moe_ops.batch_invariant():
        torch_moe_ops.fused_experts(x, q13, q2, w, ids)
        torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP)
        torch_moe_ops.fused_experts(x, q13, q2, w, ids, batch_invariant=False)
    torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP, batch_invariant=True)
    torch.ops.moe.fused_experts(x, q13, q2, w, ids, batch_invariant=True)
    torch.ops.moe.fused_experts(x, q13, q2, w, ids)  # the raw op: its schema default, False, not the switch
    assert seen == [False, False, True, True, False, True, True, False]
    with pytest.raises(TypeError, match="batch_invariant must be True, False or None"):
        torch_moe_ops.fused_experts(x, q13, q2, w, ids, batch_invariant="yes")


# ------------------------------------------------------------------------------------------ the property
def test_the_probe_can_fail():
    """``batch_variance`` finds a batch-dependent function (each row minus the batch mean) and passes a
    row-wise one: the property tests below can fail."""
    x = torch.randn(32, 16)
    assert batch_variance(lambda t: t - t.mean(0), (x,), sizes=(1, 5))[5][0] > 0
    assert batch_variance(lambda t: t * 2 + 1, (x,), sizes=(1, 5)) == {1: (0, 4), 5: (0, 20)}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_rows_do_not_depend_on_the_batch(scheme, dtype):
    """The reference (CPU): every row of a T = 64 batch is bitwise what it is alone, in a batch of 7 or 33, in
    another order and among other tokens, for fused_moe and fused_experts (its routing given)."""
    q13, q2, kw = _experts(scheme, dtype)
    x, logits = torch.randn(64, H, dtype=dtype), torch.randn(64, E)
    moe = batch_variance(lambda x, lg: torch_moe_ops.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw),
                         (x, logits), sizes=(1, 7, 33))
    assert all(bad == 0 for bad, _ in moe.values()), moe
    w, ids = torch_moe_ops.topk_route(logits, K_TOP)
    experts = batch_variance(
        lambda x, w, ids: torch_moe_ops.fused_experts(x, q13, q2, w, ids, batch_invariant=True, **kw),
        (x, w, ids), sizes=(1, 7))
    assert all(bad == 0 for bad, _ in experts.values()), experts


def test_reference_invariant_products_match_the_default_ones_closely():
    """The fixed-shape products compute the same thing (only the summation order may differ)."""
    q13, q2, kw = _experts("none", torch.float32)
    x, logits = torch.randn(40, H), torch.randn(40, E)
    a = torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP, batch_invariant=True)
    b = torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_interpreter_rows_do_not_depend_on_the_batch(scheme, monkeypatch):
    """The Triton kernels through the interpreter (CPU tensors, TORCH_MOE_OPS_BACKEND=triton): the same
    property with the invariant tiles."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    q13, q2, kw = _experts(scheme)
    x, logits = torch.randn(24, H, dtype=torch.bfloat16), torch.randn(24, E)
    got = batch_variance(lambda x, lg: torch_moe_ops.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw),
                         (x, logits), sizes=(1, 5), trials=1)
    assert all(bad == 0 for bad, _ in got.values()), got


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "mxfp4"])
def test_opcheck_in_the_mode(scheme):
    """The ops with batch_invariant=True: schema, fake, autograd registration, AOT dispatch (dynamic)."""
    from torch_moe_ops.testing import opcheck

    q13, q2, kw = _experts(scheme)
    x, logits = torch.randn(5, H, dtype=torch.bfloat16), torch.randn(5, E)
    w, ids = torch_moe_ops.topk_route(logits, K_TOP)
    opcheck(torch.ops.moe.fused_experts.default, (x, q13, q2, w, ids), dict(kw, batch_invariant=True))
    opcheck(torch.ops.moe.fused_moe.default, (x, logits, q13, q2, K_TOP), dict(kw, batch_invariant=True))
