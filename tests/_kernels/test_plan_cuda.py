"""Launch plans on CUDA (docs/host-overhead.md): a replayed call gives bitwise what the ordinary launch path gives,
on fresh inputs (pointers re-mapped), for every scheme and the odd cases; plans exist for the hot paths; a
misaligned input gets its own plan; replay works under CUDA-graph capture and in a compiled graph."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import testing
from torch_moe_ops._platform import PLANS_ENV
from torch_moe_ops.ops.fused_moe import PLANS

pytestmark = pytest.mark.cuda
DEV = "cuda"


def _weights(E, H, I, scheme, activation="silu", bias=False, seed=0):
    torch.manual_seed(seed)
    gated = not activation.endswith("_no_mul")
    w13, w2, b13, b2 = testing.random_moe_weights(E, H, I, gated=gated, dtype=torch.bfloat16, device=DEV, bias=bias)
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, activation, None)
    kw = testing.experts_kwargs(scheme, s13, s2, block)
    kw.update(activation=activation)
    if bias:
        kw.update(w13_bias=b13, w2_bias=b2)
    return q13, q2, kw


def _inputs(T, H, E, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(T, H, device=DEV, generator=g) * 0.1).bfloat16()
    return x, torch.randn(T, E, device=DEV, generator=g)


def _ordinary(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv(PLANS_ENV, "0")
        return fn()


CASES = [  # T, E, k, H, I, scheme, activation, bias
    (1, 8, 2, 136, 88, "none", "silu", False),
    (7, 60, 6, 136, 88, "none", "gelu", True),
    (300, 60, 1, 256, 128, "none", "silu", False),  # k = 1: the zeroed output path
    (33, 60, 6, 256, 128, "none", "relu2_no_mul", False),
    (64, 32, 4, 512, 256, "none", "swigluoai", True),
] + [(T, 60, 6, 512, 384, s, "silu", False) for s in ("fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16",
                                                       "int4_w4a16") for T in (1, 257)] + [
    (2000, 128, 8, 2048, 768, "fp8_block", "silu", False),  # the multi-kernel alignment path
]


@pytest.mark.parametrize("T,E,k,H,I,scheme,activation,bias", CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-{c[5]}-{c[6]}{'-bias' if c[7] else ''}" for c in CASES])
def test_replay_equals_the_ordinary_path(monkeypatch, T, E, k, H, I, scheme, activation, bias):
    PLANS.clear()
    q13, q2, kw = _weights(E, H, I, scheme, activation, bias)
    outs = []
    for seed in (1, 2, 3):  # record, then replay twice on fresh inputs
        x, logits = _inputs(T, H, E, seed)
        got = moe.fused_moe(x, logits, q13, q2, k, **kw)
        want = _ordinary(monkeypatch, lambda: moe.fused_moe(x, logits, q13, q2, k, **kw))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        outs.append(got)
    assert len(PLANS.plans) == 1 and next(iter(PLANS.plans.values())) is not None, "no replayable plan was made"
    assert not torch.equal(outs[1], outs[2])  # fresh inputs, fresh outputs (not a stale buffer)


def test_fused_experts_replay_and_expert_map(monkeypatch):
    PLANS.clear()
    E, k, H, I, T = 12, 3, 256, 128, 19
    q13, q2, kw = _weights(E, H, I, "fp8_channel")
    emap = torch.full((E * 2,), -1, dtype=torch.int32, device=DEV)
    emap[1::2] = torch.arange(E, dtype=torch.int32, device=DEV)
    for seed in (1, 2):
        x, logits = _inputs(T, H, 2 * E, seed)
        w, ids = moe.topk_route(logits, k)
        got = moe.fused_experts(x, q13, q2, w, ids, expert_map=emap, **kw)
        want = _ordinary(monkeypatch, lambda: moe.fused_experts(x, q13, q2, w, ids, expert_map=emap, **kw))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(p is not None for p in PLANS.plans.values())


def test_a_misaligned_input_gets_its_own_plan(monkeypatch):
    PLANS.clear()
    E, k, H, I, T = 8, 2, 136, 88, 5
    q13, q2, kw = _weights(E, H, I, "none")
    x, logits = _inputs(T, H, E, 1)
    moe.fused_moe(x, logits, q13, q2, k, **kw)
    buf = torch.empty(T * H + 1, dtype=torch.bfloat16, device=DEV)
    x2 = buf[1:].view(T, H)  # 2-byte offset: Triton's 16-byte alignment specialization differs
    x2.copy_(x)
    got = moe.fused_moe(x2, logits, q13, q2, k, **kw)
    want = _ordinary(monkeypatch, lambda: moe.fused_moe(x2, logits, q13, q2, k, **kw))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(PLANS.plans) == 2


def test_replay_under_cuda_graph_capture(monkeypatch):
    PLANS.clear()
    E, k, H, I, T = 60, 6, 512, 384, 16
    q13, q2, kw = _weights(E, H, I, "fp8_block")
    x, logits = _inputs(T, H, E, 1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        moe.fused_moe(x, logits, q13, q2, k, **kw)  # records the plan
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe.fused_moe(x, logits, q13, q2, k, **kw)  # replayed into the graph
    x2, logits2 = _inputs(T, H, E, 2)
    x.copy_(x2)
    logits.copy_(logits2)
    g.replay()
    want = _ordinary(monkeypatch, lambda: moe.fused_moe(x2, logits2, q13, q2, k, **kw))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["plans", "triton"])
def test_compiled_layer(mode, monkeypatch, fresh_dynamo):
    """The compiled layer's graph replays plans through the lean op (plans) or launches the kernels itself
    (triton: no plan recorded); bitwise the ordinary path either way."""
    from torch_moe_ops._platform import COMPILE_ENV

    from torch_moe_ops.ops import decompose

    monkeypatch.setenv(COMPILE_ENV, mode)
    modes = []  # what each traced call took (the failure message says it: H100 2026-12-07 failed once)
    monkeypatch.setattr(decompose, "_mode", lambda a, sig, f=decompose._mode: modes.append(f(a, sig)) or modes[-1])
    E, k, H, I = 16, 4, 256, 128
    layer = moe.FusedMoE(E, k, H, I, quant_config="fp8_block", device=DEV)
    w13, w2, _, _ = testing.random_moe_weights(E, H, I, dtype=torch.bfloat16, device=DEV)
    for e in range(E):
        layer.weight_loader(layer.w13_weight, w13[e, :I], "w1", e)
        layer.weight_loader(layer.w13_weight, w13[e, I:], "w3", e)
        layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
    moe.finalize_loading(layer)
    PLANS.clear()
    f = torch.compile(layer, fullgraph=True, dynamic=True)
    recorded = []
    for T in (3, 9, 9):
        x, logits = _inputs(T, H, E, T)
        got = f(x, logits)
        recorded.append(len(PLANS.plans))
        want = _ordinary(monkeypatch, lambda: layer(x, logits))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert modes and set(modes) == {mode}, modes
    assert bool(PLANS.plans) == (mode == "plans"), (recorded, [k[:2] for k in PLANS.plans], modes)


@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("none", "swigluoai"), ("int8_w8a16", "silu"),
                                               ("int4_w4a16", "silu"), ("fp8_block", "silu"),
                                               ("fp8_channel", "swigluoai"), ("fp8_tensor", "silu")])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_activation_fused_into_gemm1_on_the_gpu(monkeypatch, scheme, activation, T):
    """TORCH_MOE_OPS_FUSE_ACTIVATION=1 (docs/kernels.md): bitwise the two-kernel path on the GPU's tiles; fp8 at
    T = 1: GEMM1 keeps the activation in fp32 and GEMM2 quantizes it (act_and_quant's bits), in fused_moe and in
    fused_experts (whose GEMM1 quantizes x too)."""
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV

    PLANS.clear()
    E, k, H, I = 60, 6, 512, 384
    q13, q2, kw = _weights(E, H, I, scheme, activation, bias=activation == "swigluoai")
    x, logits = _inputs(T, H, E, T)
    w, ids = moe.topk_route(logits, k)
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, "0")  # (unset, T = 1 fuses)
    want = moe.fused_moe(x, logits, q13, q2, k, **kw)
    want_experts = moe.fused_experts(x, q13, q2, w, ids, **kw)
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, "1")
    PLANS.clear()
    torch.testing.assert_close(moe.fused_moe(x, logits, q13, q2, k, **kw), want, rtol=0, atol=0)
    torch.testing.assert_close(moe.fused_experts(x, q13, q2, w, ids, **kw), want_experts, rtol=0, atol=0)
    from torch_moe_ops._kernels import fused_experts as pipeline

    monkeypatch.setattr(pipeline, "quantizes_input", lambda *a: False)  # quantize_activation + act_and_quant
    PLANS.clear()
    torch.testing.assert_close(moe.fused_experts(x, q13, q2, w, ids, **kw), want_experts, rtol=0, atol=0)
    PLANS.clear()


@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("fp8_block", "silu"), ("int4_w4a16", "silu"),
                                               ("mxfp4", "swigluoai")])
@pytest.mark.parametrize("fuse_act", ["0", "1"])
@pytest.mark.parametrize("T,mapped", [(1, False), (9, False), (16, True)])
def test_gemm2_sums_the_slots_on_the_gpu(monkeypatch, scheme, activation, fuse_act, T, mapped):
    """GEMM2's fused sum up to 16 tokens (TORCH_MOE_OPS_FUSE_SUM=1; docs/kernels.md): bitwise the unfused path
    (TORCH_MOE_OPS_FUSE_SUM=0) on the GPU's tiles, call after call with fresh data (the counters' release /
    acquire), replayed plans and a CUDA graph included; T = 1 (one pair a row block) and aligned rows, with an
    expert_map that leaves some tokens no local slot."""
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV, FUSE_SUM_ENV

    monkeypatch.setenv(FUSE_ACTIVATION_ENV, fuse_act)
    E, k, H, I = 60, 6, 512, 384
    q13, q2, kw = _weights(E, H, I, scheme, activation, bias=activation == "swigluoai")
    if mapped:  # 10 of the 60 experts local: a token has no local slot with probability C(50,6)/C(60,6) ~ 32 %
        q13, q2 = q13[:10], q2[:10]
        kw = {n: (v[:10] if n in ("w13_scale", "w2_scale", "w13_bias", "w2_bias") and v is not None else v)
              for n, v in kw.items()}
        emap = torch.full((E,), -1, dtype=torch.int32, device=DEV)
        emap[:10] = torch.arange(10, dtype=torch.int32, device=DEV)
        kw.update(expert_map=emap)
    cases = [_inputs(T, H, E, seed) for seed in range(24)]
    monkeypatch.setenv(FUSE_SUM_ENV, "0")
    PLANS.clear()
    wants = [moe.fused_moe(x, logits, q13, q2, k, **kw) for x, logits in cases]
    monkeypatch.setenv(FUSE_SUM_ENV, "1")  # (the default fuses at T = 1 only)
    PLANS.clear()
    for (x, logits), want in zip(cases, wants):  # the first records, the rest replay
        torch.testing.assert_close(moe.fused_moe(x, logits, q13, q2, k, **kw), want, rtol=0, atol=0)
    x, logits = (t.clone() for t in cases[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe.fused_moe(x, logits, q13, q2, k, **kw)
    for (x2, logits2), want in list(zip(cases, wants))[1:6]:
        x.copy_(x2)
        logits.copy_(logits2)
        g.replay()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    PLANS.clear()


def _t1_case(scheme, activation, seeds):
    """The T = 1 cases of the launch-switch tests (Qwen-like E = 60, k = 6, every 7th expert not local): ``calls(x,
    logits)`` -> (fused_moe, fused_experts, fused_experts with the expert_map), and ``seeds`` (x, logits) pairs."""
    E, k, H, I = 60, 6, 512, 384
    q13, q2, kw = _weights(E, H, I, scheme, activation, bias=activation == "swigluoai")
    emap = torch.arange(E, dtype=torch.int32, device=DEV)
    emap[::7] = -1

    def calls(x, logits):
        w, ids = moe.topk_route(logits, k)
        return (moe.fused_moe(x, logits, q13, q2, k, **kw), moe.fused_experts(x, q13, q2, w, ids, **kw),
                moe.fused_experts(x, q13, q2, w, ids, expert_map=emap, **kw))

    return calls, [_inputs(1, H, E, seed) for seed in range(seeds)], (q2, k)


@pytest.mark.parametrize("switches", ["PREFETCH", "PDL", "PREFETCH,PDL"])
@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("fp8_block", "silu"), ("int4_w4a16", "silu"),
                                               ("mxfp4", "swigluoai")])
def test_t1_launch_switches_keep_the_bits_on_the_gpu(monkeypatch, scheme, activation, switches):
    """TORCH_MOE_OPS_PREFETCH=1 (GEMM1 at T = 1 brings GEMM2's weights into L2) and TORCH_MOE_OPS_PDL=1 (GEMM2 a
    programmatic dependent launch of GEMM1; docs/kernels.md): the outputs are bitwise those without them,
    fused_moe and fused_experts, recorded and replayed plans, an expert_map, a CUDA graph."""
    from torch_moe_ops._kernels import gemm

    calls, cases, (q2, k) = _t1_case(scheme, activation, 4)
    PLANS.clear()
    want = [calls(x, logits) for x, logits in cases]
    for name in switches.split(","):
        monkeypatch.setenv(f"TORCH_MOE_OPS_{name}", "1")
    assert gemm.prefetches(q2, k) == ("PREFETCH" in switches)
    seen, real = [], gemm.launch
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid, *a, **kw_: seen.append(
        (kw_["PREFETCH"], kw_["GDC"], kw_.get("launch_pdl", False))) or real(kernel, grid, *a, **kw_))
    PLANS.clear()
    for (x, logits), wants in zip(cases, want):  # the first records, the rest replay
        for got, w_ in zip(calls(x, logits), wants):
            torch.testing.assert_close(got, w_, rtol=0, atol=0)
    pdl = "PDL" in switches
    assert seen[:2] == [("PREFETCH" in switches, 1 if pdl else 0, False), (False, 2 if pdl else 0, pdl)], seen
    x, logits = (t.clone() for t in cases[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = calls(x, logits)
    for (x2, logits2), wants in list(zip(cases, want))[1:]:
        x.copy_(x2)
        logits.copy_(logits2)
        g.replay()
        for got, w_ in zip(out, wants):
            torch.testing.assert_close(got, w_, rtol=0, atol=0)
    PLANS.clear()


def test_int4_prefill_tiles_are_swapped_by_default(monkeypatch):
    """configs.swaps (docs/kernels.md, "Swapped operands"): without the switch, int4's 128-row prefill tiles run
    swapped, its decode tiles do not; the output is the unswapped one up to the MMA's rounding (as a norm: bf16
    intermediates may round the other way near a cancellation)."""
    from torch_moe_ops._kernels import gemm

    E, k, H, I, T = 8, 2, 512, 384, 1024  # 256 rows per expert: 128-row tiles
    q13, q2, kw = _weights(E, H, I, "int4_w4a16")
    x, logits = _inputs(T, H, E, 3)
    seen, real = [], gemm.launch
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid, *a, **kw_: seen.append((kw_["BLOCK_M"], kw_["SWAP_AB"]))
                        or real(kernel, grid, *a, **kw_))
    PLANS.clear()  # record: the launches go through gemm.launch
    got = moe.fused_moe(x, logits, q13, q2, k, **kw)
    moe.fused_moe(x[:1], logits[:1], q13, q2, k, **kw)  # T = 1: 16-row tiles
    assert {s for bm, s in seen if bm >= 64} == {True} and {s for bm, s in seen if bm < 64} == {False}, seen
    monkeypatch.setattr(gemm, "swaps", lambda *a, **kw_: False)
    PLANS.clear()
    want = moe.fused_moe(x, logits, q13, q2, k, **kw)
    PLANS.clear()
    assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()


@pytest.mark.parametrize("ahead", ["0", "2"])
@pytest.mark.parametrize("scheme,activation", [("fp8_block", "silu"), ("fp8_channel", "silu"), ("int4_w4a16", "silu"),
                                               ("mxfp4", "swigluoai")])
def test_loads_a_step_ahead_keep_the_bits_on_the_gpu(monkeypatch, scheme, activation, ahead):
    """TORCH_MOE_OPS_LOAD_AHEAD=0 (every scale and fp8 row in its own step) and =2 (wider steps' scales ahead too)
    against the default 1 (docs/kernels.md): bitwise the same outputs at T = 1 (pair rows) and T = 5 (aligned
    16-row tiles), recorded and replayed plans."""
    from torch_moe_ops._platform import LOAD_AHEAD_ENV

    E, k, H, I = 40, 4, 640, 384
    q13, q2, kw = _weights(E, H, I, scheme, activation, bias=activation == "swigluoai")
    cases = [_inputs(T, H, E, seed) for T in (1, 5) for seed in range(2)]
    monkeypatch.setenv(LOAD_AHEAD_ENV, "1")
    PLANS.clear()
    want = [moe.fused_moe(x, logits, q13, q2, k, **kw) for x, logits in cases]
    monkeypatch.setenv(LOAD_AHEAD_ENV, ahead)
    PLANS.clear()
    for _ in range(2):  # records, then replays
        for (x, logits), w_ in zip(cases, want):
            torch.testing.assert_close(moe.fused_moe(x, logits, q13, q2, k, **kw), w_, rtol=0, atol=0)
    PLANS.clear()
