"""Batch-invariant mode (docs/batch-invariance.md) on CPU: the switch, how the op argument reaches the
implementations, and the property itself for the reference and the Triton interpreter, every scheme.

The GPU half (every scheme at T = 1 ... 4096, CUDA graphs, compile) is tests/ops/test_batch_invariance_cuda.py."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops
from torch_moe_ops.schemes import QUANT_SCHEMES, get_quant_scheme
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


@pytest.fixture
def two_threads():
    """torch's CPU elementwise kernels split tensors over 32768 elements between threads (xdist workers run
    with one): the splits move the vector / scalar boundary."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("activation", ["silu", "swigluoai", "gelu"])
def test_reference_fp32_elementwise_tails_do_not_leak(activation):
    """fp32, one expert, I = 520, T = 512 against batches of 65: torch's CPU activation kernels take a
    vectorized body and a scalar tail (which round transcendentals differently), placed by the tensor's size
    and its thread split (silu: 2 of 390 rows differed before ``reference.invariant.rowwise``). In the mode
    each row takes one path."""
    torch.manual_seed(0)
    w13, w2 = torch.randn(1, 1040, 64) / 10, torch.randn(1, 64, 520) / 10
    x, logits = torch.randn(512, 64), torch.randn(512, 1)
    got = batch_variance(lambda x, lg: torch_moe_ops.fused_moe(x, lg, w13, w2, 1, activation=activation,
                                                               batch_invariant=True),
                         (x, logits), sizes=(65,), trials=3, generator=torch.Generator().manual_seed(0))
    assert all(bad == 0 for bad, _ in got.values()), got


def test_reference_routing_rows_do_not_depend_on_the_batch():
    """The CPU routing (softmax / sigmoid scores) is row-invariant in any mode (sigmoid weights of 90 of 4000
    tokens differed alone vs in the batch before ``rowwise``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logits = torch.randn(4096, 6) * 3
        for scoring in ("softmax", "sigmoid"):
            full = torch_moe_ops.topk_route(logits, 2, scoring_func=scoring)[0]
            for n in (1, 3, 5, 7):
                parts = torch.cat([torch_moe_ops.topk_route(logits[s:s + n], 2, scoring_func=scoring)[0]
                                   for s in range(0, 4096, n)])
                assert torch.equal(parts.view(torch.int32), full.view(torch.int32)), (scoring, n)
    finally:
        torch.set_num_threads(before)


def test_reference_invariant_products_match_the_default_ones_closely():
    """The fixed-shape products compute the same thing (only the summation order may differ)."""
    q13, q2, kw = _experts("none", torch.float32)
    x, logits = torch.randn(40, H), torch.randn(40, E)
    a = torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP, batch_invariant=True)
    b = torch_moe_ops.fused_moe(x, logits, q13, q2, K_TOP)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_interpreter_rows_do_not_depend_on_the_batch(scheme, dtype, monkeypatch):
    """The Triton kernels through the interpreter (CPU tensors, TORCH_MOE_OPS_BACKEND=triton): the same
    property. The interpreter's dot is NumPy's, which rounds a row by its place in the tile: in the mode every
    pair sits alone at row 0 of its block (fp32 rows differed without that)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    if dtype == torch.float32 and get_quant_scheme(scheme).fp8_dot:
        pytest.skip("fp8 schemes quantize fp32 activations like bf16 ones: the bf16 case covers them")
    q13, q2, kw = _experts(scheme, dtype)
    # 12 tokens (24 pairs) against batches of 1, 2, 4 and 8: every pair's tile changes company (the interpreter
    # walks whole tiles, so each pair costs seconds: the suite's heaviest test at 24 tokens)
    x, logits = torch.randn(12, H, dtype=dtype), torch.randn(12, E)
    got = batch_variance(lambda x, lg: torch_moe_ops.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw),
                         (x, logits), sizes=(1, 4), trials=1)
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expert_map_and_weights_on_input_rows_do_not_depend_on_the_batch(backend, monkeypatch):
    """EP-style local experts (``expert_map``: pairs of other ranks' experts dropped) with the router weight
    applied to GEMM1's input, biases on, k = 3: the same property."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    from torch_moe_ops.testing import random_moe_weights as weights

    w13, w2, b13, b2 = weights(4, H, I, dtype=torch.bfloat16, bias=True)
    emap = torch.tensor([-1, 0, 1, -1, 2, 3], dtype=torch.int32)  # 6 global experts, 4 here
    x, logits = torch.randn(24, H, dtype=torch.bfloat16), torch.randn(24, 6)
    w, ids = torch_moe_ops.topk_route(logits, 3)
    got = batch_variance(
        lambda x, w, ids: torch_moe_ops.fused_experts(x, w13, w2, w, ids, w13_bias=b13, w2_bias=b2, expert_map=emap,
                                                      apply_router_weight_on_input=True, batch_invariant=True),
        (x, w, ids), sizes=(1, 5), trials=1)
    assert all(bad == 0 for bad, _ in got.values()), got
