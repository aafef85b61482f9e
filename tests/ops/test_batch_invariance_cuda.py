"""Batch-invariant mode on the GPU (docs/batch-invariance.md): every scheme, rows of a T = 4096 batch bitwise
equal to the same tokens alone and among others at T = 1, 7, 64 and 1000, run to run, under CUDA-graph replay,
and compiled (``fullgraph=True, dynamic=True``); the tiles' reduction signature the same for every T."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops._kernels import configs
from torch_moe_ops.schemes import QUANT_SCHEMES, get_quant_scheme
from torch_moe_ops.testing import batch_variance, experts_kwargs, quantize_experts, random_moe_weights

pytestmark = pytest.mark.cuda
E, K_TOP, H, I = 128, 8, 2048, 768  # the Qwen3-30B-A3B layer: the tiles the tuned tables serve
T_FULL, SIZES = 4096, (1, 7, 64, 1000)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.bfloat16, device="cuda")
    return w13, w2


def _scheme_case(weights, scheme):
    q13, q2, s13, s2, block = quantize_experts(*weights, scheme)
    return q13, q2, experts_kwargs(scheme, s13, s2, block)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_rows_do_not_depend_on_the_batch(weights, scheme):
    q13, q2, kw = _scheme_case(weights, scheme)
    x = (torch.randn(T_FULL, H, device="cuda") * 0.5).bfloat16()
    logits = torch.randn(T_FULL, E, device="cuda")

    def moe_call(x, lg):
        return moe.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw)

    got = batch_variance(moe_call, (x, logits), sizes=SIZES, trials=1)
    assert all(bad == 0 for bad, _ in got.values()), f"{scheme}: {got}"
    assert torch.equal(moe_call(x, logits), moe_call(x, logits))  # run to run
    w, ids = moe.topk_route(logits, K_TOP)
    got = batch_variance(lambda x, w, ids: moe.fused_experts(x, q13, q2, w, ids, batch_invariant=True, **kw),
                         (x, w, ids), sizes=(1, 64), trials=1)
    assert all(bad == 0 for bad, _ in got.values()), f"{scheme} fused_experts: {got}"


@pytest.mark.parametrize("scheme", [s for s in QUANT_SCHEMES if QUANT_SCHEMES[s].flags.W_CAST])
def test_swapped_operands_keep_rows_invariant_with_token_sized_tiles(weights, scheme, monkeypatch):
    """TORCH_MOE_OPS_SWAP_AB=1 (docs/kernels.md "Swapped operands"): the weights are the wgmma's M at every T, so
    the mode's tiles widen BLOCK_N, not BLOCK_M; rows still do not depend on the batch, and the rows equal the
    unswapped mode's to bf16 rounding. (Not yet run on a GPU when written.)"""
    from torch_moe_ops._platform import SWAP_AB_ENV

    q13, q2, kw = _scheme_case(weights, scheme)
    x = (torch.randn(T_FULL, H, device="cuda") * 0.5).bfloat16()
    logits = torch.randn(T_FULL, E, device="cuda")
    want = moe.fused_moe(x, logits, q13, q2, K_TOP, batch_invariant=True, **kw)
    monkeypatch.setenv(SWAP_AB_ENV, "1")
    moe.clear_launch_plans()
    try:
        def moe_call(x, lg):
            return moe.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw)

        got = batch_variance(moe_call, (x, logits), sizes=SIZES, trials=1)
        assert all(bad == 0 for bad, _ in got.values()), f"{scheme}: {got}"
        # Other tiles, other fp32 sums: a bf16 intermediate (c1, the activation) may round the other way and the
        # layer's output moves by ~2^-8 of a summand, which near a cancellation is most of an element (H100:
        # 6 of 8.4M mxfp4 elements off by 0.031, one at 84 %). So the whole output is compared, as a norm.
        got = moe_call(x, logits).float()
        assert (got - want.float()).norm() <= 1e-2 * want.float().norm(), scheme  # 40 dB: a wrong tile is O(1)
    finally:
        moe.clear_launch_plans()


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "int4_w4a16", "mxfp4"])
def test_graph_replay_and_compiled_calls_equal_eager(weights, scheme):
    """A CUDA graph of the invariant call, and a compiled function, give the eager rows bitwise."""
    q13, q2, kw = _scheme_case(weights, scheme)
    x = (torch.randn(96, H, device="cuda") * 0.5).bfloat16()
    logits = torch.randn(96, E, device="cuda")

    def call(x, lg):
        return moe.fused_moe(x, lg, q13, q2, K_TOP, batch_invariant=True, **kw)

    want = call(x, logits)
    call(x, logits)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call(x, logits)
    g.replay()
    assert torch.equal(out, want)
    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    for T in (1, 33, 96):
        assert torch.equal(compiled(x[:T], logits[:T]), want[:T])


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_one_reduction_signature_for_every_token_count(scheme):
    """This GPU's invariant tiles (tuned table or heuristic): one (BLOCK_K, wgmma) for every T bucket of each GEMM,
    and the largest bucket's tiles unchanged (prefill pays nothing)."""
    s = get_quant_scheme(scheme)
    block = s.block_shape(None) if s.tiled else None
    dev = torch.device("cuda")
    for N, K in ((2 * I, H), (H, I)):
        a_bytes = 1 if s.fp8_dot else 2
        sigs = {configs.reduction_signature(configs.get_config(T, E, N, K, s, block, dev, top_k=K_TOP,
                                                               invariant=True, dtype=torch.bfloat16), s, a_bytes)
                for T in (*configs.TOKEN_BUCKETS, configs.BEYOND)}
        assert len(sigs) == 1, (scheme, N, K, sigs)
        big = configs.get_config(configs.BEYOND, E, N, K, s, block, dev, top_k=K_TOP)
        if big.block_m >= configs.INVARIANT_MIN_BLOCK_M:
            assert configs.get_config(configs.BEYOND, E, N, K, s, block, dev, top_k=K_TOP, invariant=True) == big


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_linear_rows_do_not_depend_on_the_batch(dtype):
    """``moe::linear`` (MoEBlock routers in the mode): a [T, 2048] @ [2048, 128] router's rows at T = 4096
    against 1, 7, 64, 1000; close to F.linear."""
    from torch_moe_ops.ops import linear

    x = torch.randn(T_FULL, H, device="cuda").to(dtype)
    w, b = (torch.randn(E, H, device="cuda") / 32).to(dtype), torch.randn(E, device="cuda").to(dtype)
    got = batch_variance(lambda x: linear(x, w, b, batch_invariant=True), (x,), sizes=SIZES, trials=1)
    assert all(bad == 0 for bad, _ in got.values()), got
    torch.testing.assert_close(linear(x, w, b, batch_invariant=True).float(),
                               torch.nn.functional.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
