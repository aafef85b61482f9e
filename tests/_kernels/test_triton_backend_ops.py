"""The op suite once more with the Triton kernels behind the CPU dispatch key (TORCH_MOE_OPS_BACKEND=triton,
interpreter), on small shapes; plus a hypothesis fuzz of fused_moe against the reference (NaN tokens, empty
experts, T = 1, E not a power of two, on-input weighting)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import torch_moe_ops as moe  # noqa: E402
from torch_moe_ops import reference  # noqa: E402
from torch_moe_ops.schemes import QUANT_SCHEMES, get_activation, get_quant_scheme  # noqa: E402
from torch_moe_ops.testing import random_moe_weights, sqnr_db, w13_shards  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")


#: int4 groups must divide H and I: the int4 cases use multiples of this group size.
INT4_GROUP = 32


def _dims(scheme, H, I):
    """(H, I) rounded up to whole int4 groups for int4_w4a16, unchanged otherwise."""
    if get_quant_scheme(scheme).packed:
        return -(-H // INT4_GROUP) * INT4_GROUP, -(-I // INT4_GROUP) * INT4_GROUP
    return H, I


def _weights(E, H, I, scheme, activation="silu", bias=False, dtype=torch.float16):
    act, sch = get_activation(activation), get_quant_scheme(scheme)
    w13, w2, b13, b2 = random_moe_weights(E, H, I, gated=act.gated, dtype=dtype, device=DEV, bias=bias)
    kw = dict(activation=activation)
    if bias:
        kw.update(w13_bias=b13, w2_bias=b2)
    if not sch.quantized:
        return w13, w2, kw
    shards = w13_shards(sch, act)  # gate/up scales only for the halves layout
    # fp8 tl.dot needs K >= 32 on the GPU (configs raise a clear error for smaller K blocks); the interpreter
    # takes 16, which keeps the CPU runs cheap. int4 groups: [1, 32].
    block = None
    if sch.flags.BLOCK_SCALES:
        block = [32, 32] if torch.cuda.is_available() else [16, 16]
    elif sch.tiled:
        block = [1, INT4_GROUP]
    q13, s13 = moe.quantize_weight(w13, sch.weight.name, shards=shards, block_shape=block)
    q2, s2 = moe.quantize_weight(w2, sch.weight.name, block_shape=block)
    kw.update(quant_scheme=scheme, w13_scale=s13, w2_scale=s2, block_shape=block)
    return q13, q2, kw


def test_fp8_block_scale_tiles_of_any_k():
    """block_shape [16, 96] (K not a power of two; a GPU's fp8 dot takes K steps of 32): the activation groups
    follow it, as in the reference (the Triton path asserted on a power of two before)."""
    E, k, H, I = 4, 2, 192, 96
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.float16, device=DEV)
    q13, s13 = moe.quantize_weight(w13, "fp8_block", block_shape=[16, 96])
    q2, s2 = moe.quantize_weight(w2, "fp8_block", block_shape=[16, 96])
    kw = dict(quant_scheme="fp8_block", w13_scale=s13, w2_scale=s2, block_shape=[16, 96])
    for T in (1, 9, 70):  # pair blocks, routing-side alignment, the alignment kernel
        x, logits = (torch.randn(T, H, device=DEV) * 0.1).half(), torch.randn(T, E, device=DEV)
        out = moe.fused_moe(x, logits, q13, q2, k, **kw)
        assert sqnr_db(_ref(x, logits, q13, q2, k, kw), out.float().cpu()) > 25, T


def _ref(x, logits, q13, q2, k, kw, route_kw=None):
    w, ids = reference.topk_route(logits.cpu(), k, **(route_kw or {}))
    cpu = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    return reference.fused_experts(x.cpu().float(), q13.cpu(), q2.cpu(), w, ids, **cpu)


def _weight_only(scheme) -> bool:
    sch = get_quant_scheme(scheme)
    return sch.quantized and not sch.fp8_dot


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
@pytest.mark.parametrize("T", [1, 9])
def test_fused_moe_triton_backend(scheme, T):
    E, k = 4, 2
    H, I = _dims(scheme, 40, 24)
    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    q13, q2, kw = _weights(E, H, I, scheme, dtype=dtype)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    out = moe.fused_moe(x, logits, q13, q2, k, **kw)
    assert out.shape == (T, H) and out.dtype == dtype
    # Same quantized weights both sides; the kernel rounds intermediates to fp16/bf16 (and re-quantizes
    # those to fp8), the reference keeps fp32: 30 dB leaves margin above that rounding (~40-50 dB).
    assert sqnr_db(_ref(x, logits, q13, q2, k, kw), out.float().cpu()) > 30


@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_channel", "fp8_block", "int4_w4a16", "mxfp4"])
@pytest.mark.parametrize("T", [1, 3])
def test_loads_a_step_ahead_keep_the_bits(monkeypatch, scheme, T):
    """Decode tiles load the next K step's scales (and at T = 1 fp8's row, quantized in GEMM1 and GEMM2) a step
    ahead: bitwise the in-step loads (TORCH_MOE_OPS_LOAD_AHEAD=0; 2: the [BK/G, BN] scales too), K tails included (I = 96: K steps past it)."""
    from torch_moe_ops._platform import LOAD_AHEAD_ENV

    E, k, H, I = 5, 2, 160, 96
    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    q13, q2, kw = _weights(E, H, I, scheme, dtype=dtype)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    outs = []
    packed = scheme in ("int4_w4a16", "mxfp4")  # 2 differs from 1 only in packed [BK/G, BN] scale tiles
    for flag in ("1", "2", "0") if packed else ("1", "0"):
        monkeypatch.setenv(LOAD_AHEAD_ENV, flag)
        moe.clear_launch_plans()
        outs.append(moe.fused_moe(x, logits, q13, q2, k, **kw))
    moe.clear_launch_plans()
    assert outs[0].isfinite().all() and all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "fp8_channel", "int4_w4a16"])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("T", [1, 9])
def test_fused_moe_equals_route_then_experts(scheme, on_input, T):
    """fused_moe's launches do two jobs of the separate ops (_kernels/routing.py): at T = 1 the routing kernel
    writes the alignment (one pair per block), and for fp8 schemes it quantizes x. Bitwise what topk_route +
    fused_experts (the alignment and quantization kernels) give, with an expert_map dropping some experts."""
    E, E_local, k = 9, 5, 4
    H, I = _dims(scheme, 40, 24)
    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    q13, q2, kw = _weights(E_local, H, I, scheme, dtype=dtype)
    emap = torch.tensor([0, -1, 1, 2, -1, 3, -1, 4, -1], dtype=torch.int32, device=DEV)
    kw.update(expert_map=emap, apply_router_weight_on_input=on_input)
    torch.manual_seed(1)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    out = moe.fused_moe(x, logits, q13, q2, k, **kw)
    w, ids = moe.topk_route(logits, k)
    assert (emap[ids.long()] == -1).any() and (emap[ids.long()] >= 0).any()  # both kinds of pair
    assert torch.equal(out, moe.fused_experts(x, q13, q2, w, ids, **kw))


def test_routing_and_align_triton_backend():
    logits = torch.randn(9, 16, device=DEV)
    bias = torch.randn(16, device=DEV) * 0.1
    w, ids = moe.topk_route(logits, 3, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
                            e_score_correction_bias=bias, routed_scaling_factor=2.5)
    rw, rids = reference.topk_route(logits.cpu(), 3, True, "sigmoid", 4, 2, bias.cpu(), 2.5)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, atol=1e-5, rtol=1e-5)
    got = moe.align_block_size(ids, 16, 4)
    want = reference.align_block_size(rids, 16, 4)
    for g, r in zip(got, want):
        assert torch.equal(g.cpu(), r)


def test_act_sum_quant_triton_backend():
    x = torch.randn(7, 48, device=DEV, dtype=torch.float16)
    for act in moe.ACTIVATIONS:
        torch.testing.assert_close(moe.act_and_mul(x, act, limit=7.0 if act == "swigluoai" else 0.0).cpu(),
                                   reference.act_and_mul(x.cpu(), act, limit=7.0 if act == "swigluoai" else 0.0),
                                   atol=2e-3, rtol=2e-3)
    y = torch.randn(7, 3, 40, device=DEV)
    torch.testing.assert_close(moe.moe_sum(y).cpu(), reference.moe_sum(y.cpu()), atol=1e-5, rtol=1e-5)
    w = torch.randn(2, 40, 72, device=DEV)
    q, s = moe.quantize_weight(w, "fp8_block", block_shape=[32, 32])
    rq, rs = reference.quantize_weight(w.cpu(), "fp8_block", [32, 32])
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    torch.testing.assert_close(s.cpu(), rs)
    qa, sa = moe.quantize_activation(x, "fp8_token")
    rqa, rsa = reference.quantize_activation(x.cpu(), "fp8_token")
    assert torch.equal(qa.cpu().view(torch.uint8), rqa.view(torch.uint8))
    w4 = torch.randn(2, 40, 64, device=DEV)
    q4, s4 = moe.quantize_weight(w4, "int4_group", block_shape=[1, 32])
    rq4, rs4 = reference.quantize_weight(w4.cpu(), "int4_group", [1, 32])
    assert q4.dtype == torch.uint8 and q4.shape == (2, 40, 32) and s4.shape == (2, 40, 2)
    assert torch.equal(q4.cpu(), rq4) and torch.equal(s4.cpu(), rs4)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 17), E=st.integers(2, 5), k=st.integers(1, 2), H=st.integers(4, 48), I=st.integers(2, 24),
       scheme=st.sampled_from(list(QUANT_SCHEMES)),
       activation=st.sampled_from(["silu", "gelu_tanh", "swigluoai", "silu_no_mul"]),
       nan_row=st.one_of(st.none(), st.integers(0, 16)), empty=st.booleans(), on_input=st.booleans())
def test_fuzz_fused_moe_triton_vs_reference(T, E, k, H, I, scheme, activation, nan_row, empty, on_input):
    """Random shapes (T = 1, E not a power of two), empty experts (odd experts never routed), on-input
    weighting, and a NaN token whose row must be NaN on both sides while the others still match."""
    k = min(k, (E + 1) // 2 if empty else E)
    H, I = _dims(scheme, H, I)
    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    q13, q2, kw = _weights(E, H, I, scheme, activation=activation, dtype=dtype)
    kw.update(apply_router_weight_on_input=on_input)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    if empty:
        logits[:, 1::2] = -float("inf")
    keep = torch.ones(T, dtype=torch.bool)
    if nan_row is not None:
        nan_row %= T
        x[nan_row, nan_row % H] = float("nan")
        keep[nan_row] = False
    out = moe.fused_moe(x, logits, q13, q2, k, **kw).float().cpu()
    ref = _ref(x, logits, q13, q2, k, kw)
    if nan_row is not None:
        assert out[nan_row].isnan().all() and ref[nan_row].isnan().all()
    out, ref = out[keep], ref[keep]
    assert torch.isfinite(out).all(), "a NaN token leaked into another row"
    if ref.numel() == 0:
        return
    # fp8 with tiny K: a single re-quantization flip is a larger share of the signal, hence 20 dB there.
    # Tiny H/I give outputs near fp16's subnormal range (~1e-7, spacing 6e-8), where SQNR measures the
    # output format, not the kernel: such cases are judged by absolute error instead.
    if ref.abs().max() > 1e-4:
        assert sqnr_db(ref, out) > (20 if get_quant_scheme(scheme).fp8_dot else 30)
    else:
        assert (ref - out).abs().max() < 2e-6


def _mapped_case(scheme, activation, dtype, T):
    """5 local experts of 7 (an expert_map with holes), k = 2, biases, small odd dims: (x, logits, w13, w2, k,
    fused_moe keywords)."""
    E, k = 5, 2
    H, I = _dims(scheme, 40, 24)
    q13, q2, kw = _weights(E, H, I, scheme, activation=activation, bias=True, dtype=dtype)
    kw.update(expert_map=torch.tensor([0, 1, -1, 2, 3, 4, -1], dtype=torch.int32, device=DEV))
    torch.manual_seed(T)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    return x, torch.randn(T, 7, device=DEV), q13, q2, k, kw


@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("none", "swigluoai"), ("int8_w8a16", "gelu"),
                                               ("int4_w4a16", "silu"), ("none", "silu_no_mul"), ("fp8_block", "silu"),
                                               ("fp8_channel", "swigluoai"), ("fp8_tensor", "silu_no_mul")])
@pytest.mark.parametrize("T", [1, 9])
def test_activation_fused_into_gemm1_is_bitwise_the_two_kernels(monkeypatch, scheme, activation, T):
    """TORCH_MOE_OPS_FUSE_ACTIVATION=1: GEMM1's epilogue applies the gated activation (schemes without
    activation quantization; fp8 at T = 1, where GEMM2 quantizes the activation's fp32 output itself; non-gated
    activations keep the activation kernel): bitwise what GEMM1 + act_and_mul (act_and_quant) give, clamp
    (swigluoai: interleaved, limit 7), biases and an expert_map included."""
    from torch_moe_ops._kernels.activation import act_and_mul, act_and_quant
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV

    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    x, logits, q13, q2, k, kw = _mapped_case(scheme, activation, dtype, T)
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, "0")  # (unset, T = 1 fuses)
    moe.clear_launch_plans()
    want = moe.fused_moe(x, logits, q13, q2, k, **kw)
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, "1")
    moe.clear_launch_plans()  # the switch is read when a CUDA call's launch plan is recorded
    from torch_moe_ops._kernels import fused_experts as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "act_and_mul", lambda *a, **k: calls.append("mul") or act_and_mul(*a, **k))
    monkeypatch.setattr(pipeline, "act_and_quant", lambda *a, **k: calls.append("quant") or act_and_quant(*a, **k))
    got = moe.fused_moe(x, logits, q13, q2, k, **kw)
    assert torch.equal(got, want)
    quantized_act = get_quant_scheme(scheme).act is not None  # act_and_quant, fused at T = 1 only
    fused = get_activation(activation).gated and (not quantized_act or T == 1)
    assert calls == ([] if fused else ["quant"] if quantized_act else ["mul"]), calls
    moe.clear_launch_plans()  # no plan recorded with the switch on outlives the test


@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("fp8_block", "silu"), ("int4_w4a16", "gelu"),
                                               ("mxfp4", "swigluoai")])
@pytest.mark.parametrize("fuse_act", ["0", "1"])
def test_gemm2_sums_the_slots_bitwise_moe_sum(monkeypatch, scheme, activation, fuse_act):
    """fused_moe's GEMM2 also sums the k slots (the program storing a token's last local slot of a column block;
    moe_sum's slot order): at T = 1 by default (one pair a row block), up to 16 tokens with
    TORCH_MOE_OPS_FUSE_SUM=1 (aligned rows), never with =0: no moe_sum launch, the output bitwise the unfused one,
    with an expert_map dropping slots, biases, and GEMM1's fused activation (which clears the counters); T = 17
    keeps moe_sum."""
    from torch_moe_ops._kernels import fused_experts as pipeline
    from torch_moe_ops._kernels import moe_sum as moe_sum_mod
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV, FUSE_SUM_ENV

    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, fuse_act)
    for T in (1, 9, 17):
        x, logits, q13, q2, k, kw = _mapped_case(scheme, activation, dtype, T)
        k = 3  # three slots of 5 local experts: some dropped by the map
        monkeypatch.setenv(FUSE_SUM_ENV, "0")
        moe.clear_launch_plans()
        want = moe.fused_moe(x, logits, q13, q2, k, **kw)
        calls = []
        monkeypatch.setattr(pipeline, "moe_sum", lambda *a, **k_: calls.append(1) or moe_sum_mod.moe_sum(*a, **k_))
        for flag, fused in ((None, T == 1), ("1", T <= 16)):  # the default, then the switch on
            if flag is None:
                monkeypatch.delenv(FUSE_SUM_ENV)
            else:
                monkeypatch.setenv(FUSE_SUM_ENV, flag)
            moe.clear_launch_plans()  # the switch is read when a CUDA call's launch plan is recorded
            calls.clear()
            got = moe.fused_moe(x, logits, q13, q2, k, **kw)
            assert torch.equal(got, want) and got.shape == want.shape, (T, flag)
            assert calls == ([] if fused else [1]), (T, flag)
    moe.clear_launch_plans()


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mapped", [False, True])
def test_gemm2_sums_aligned_rows_with_dropped_tokens(monkeypatch, ids_dtype, mapped):
    """fused_experts' fused sum on aligned rows (T = 2-16, TORCH_MOE_OPS_FUSE_SUM=1): tokens whose every slot is
    not local under the expert_map get zero rows, partly dropped tokens the sum of their local slots, bitwise moe_sum. (Ids out of
    range are refused by the checks; the kernels' rule for them is pair_expert's, which this shares with the
    alignment and moe_sum.)"""
    from torch_moe_ops._kernels import fused_experts as pipeline
    from torch_moe_ops._kernels import moe_sum as moe_sum_mod
    from torch_moe_ops._platform import FUSE_SUM_ENV

    E, H, I, k = 5, 40, 24, 3
    q13, q2, kw = _weights(E, H, I, "none", activation="silu", bias=True, dtype=torch.float16)
    if mapped:  # 9 global experts, 4 not local: 2, 5, 7, 8
        kw.update(expert_map=torch.tensor([0, 1, -1, 2, 3, -1, 4, -1, -1], dtype=torch.int32, device=DEV))
        ids = [[2, 5, 7], [0, 2, 6], [8, 7, 5], [1, 3, 4], [4, 0, 8], [3, 1, 0], [2, 7, 6]]
    else:
        ids = [[2, 4, 1], [0, 2, 4], [3, 1, 0], [1, 3, 4], [4, 0, 2], [3, 1, 0], [2, 0, 1]]
    ids = torch.tensor(ids, dtype=ids_dtype, device=DEV)
    torch.manual_seed(1)
    T = ids.shape[0]
    x = (torch.randn(T, H, device=DEV) * 0.3).half()
    w = torch.rand(T, k, device=DEV)
    monkeypatch.setenv(FUSE_SUM_ENV, "0")
    moe.clear_launch_plans()
    want = moe.fused_experts(x, q13, q2, w, ids, **kw)
    monkeypatch.setenv(FUSE_SUM_ENV, "1")
    moe.clear_launch_plans()
    calls = []
    monkeypatch.setattr(pipeline, "moe_sum", lambda *a, **k_: calls.append(1) or moe_sum_mod.moe_sum(*a, **k_))
    got = moe.fused_experts(x, q13, q2, w, ids, **kw)
    assert torch.equal(got, want) and calls == []
    if mapped:
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
    moe.clear_launch_plans()


def test_gemm1_clears_the_sum_counters_and_gemm2_leaves_them_full():
    """The fused sum's counters: GEMM1 (``zero_counts``) clears stale values, GEMM2 (``sum_into``) counts every
    slot of every column block, and the last one writes the slot sum (moe_sum of GEMM2's rows)."""
    from torch_moe_ops._kernels.configs import TileConfig
    from torch_moe_ops._kernels.gemm import invoke_moe_gemm
    from torch_moe_ops._kernels.moe_sum import SlotSum, moe_sum
    from torch_moe_ops._kernels.routing import pair_blocks_of

    E, k, H, I, bm = 6, 4, 48, 32, 16
    scheme = get_quant_scheme("none")
    torch.manual_seed(0)
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.float16, device=DEV)
    ids = torch.tensor([[4, 0, 5, 2]], dtype=torch.int32, device=DEV)
    align = pair_blocks_of(ids, E, bm, None)
    cfg = TileConfig(bm, 16, 32, 1, 4, 2)
    counts = torch.full((3,), 7, dtype=torch.int32, device=DEV)  # stale: H / BLOCK_N = 3 column blocks
    x = (torch.randn(1, H, device=DEV) * 0.3).half()
    c1 = torch.empty(k, 2 * I, dtype=torch.float16, device=DEV)
    invoke_moe_gemm(x, w13, c1, *align, top_k=k, config=cfg, scheme=scheme, zero_counts=(counts, 3))
    assert counts.tolist() == [0, 0, 0]
    a2 = c1[:, :I].contiguous()
    c3, out = torch.empty(k, H, dtype=torch.float16, device=DEV), torch.empty(1, H, dtype=torch.float16, device=DEV)
    weights = torch.rand(1, k, device=DEV)
    invoke_moe_gemm(a2, w2, c3, *align, top_k=1, config=cfg, scheme=scheme, topk_weights=weights,
                    sum_into=SlotSum(out, counts))
    assert counts.tolist() == [k] * 3
    assert torch.equal(out, moe_sum(c3.view(1, k, H)))


@pytest.mark.parametrize("scheme,activation,dtype", [("int8_w8a16", "silu", torch.bfloat16),
                                                     ("int4_w4a16", "silu", torch.bfloat16),
                                                     ("int4_w4a16", "gelu", torch.float16),
                                                     ("mxfp4", "swigluoai", torch.bfloat16)])
@pytest.mark.parametrize("T", [1, 9])
def test_swapped_operands_match_the_unswapped_gemm(monkeypatch, scheme, activation, dtype, T):
    """TORCH_MOE_OPS_SWAP_AB=1 (docs/kernels.md, "Swapped operands"): the GEMMs whose weights are converted in
    registers compute w @ aᵀ and transpose the tile back; the same products summed in the same K order, so the
    output is the unswapped one up to the MMA's rounding (bitwise in the interpreter), biases, an expert_map and
    the fused activation's epilogue included."""
    from torch_moe_ops._kernels import gemm
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV, SWAP_AB_ENV

    x, logits, q13, q2, k, kw = _mapped_case(scheme, activation, dtype, T)
    want = moe.fused_moe(x, logits, q13, q2, k, **kw)
    swapped = []
    monkeypatch.setattr(gemm, "launch", lambda kernel, grid, *a, **kw_: swapped.append(kw_["SWAP_AB"])
                        or launch(kernel, grid, *a, **kw_))
    from torch_moe_ops._kernels.plan import launch

    for fuse in ("0", "1"):
        monkeypatch.setenv(FUSE_ACTIVATION_ENV, fuse)
        monkeypatch.setenv(SWAP_AB_ENV, "1")
        moe.clear_launch_plans()  # both switches are read when a launch plan is recorded
        got = moe.fused_moe(x, logits, q13, q2, k, **kw)
        if DEV == "cpu":
            assert torch.equal(got, want), fuse
        else:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=fuse)
    assert swapped and all(swapped), swapped
    moe.clear_launch_plans()  # no plan recorded with the switches on outlives the test


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 40), E=st.sampled_from([3, 8, 60, 128, 160]), k=st.integers(1, 6), G=st.sampled_from([0, 4]),
       scheme=st.sampled_from(["none", "fp8_block", "fp8_channel", "int8_w8a16"]), mapped=st.booleans(),
       on_input=st.booleans())
def test_fuzz_fused_moe_equals_route_then_experts(T, E, k, G, scheme, mapped, on_input):
    """fused_moe's routing kernel also aligns (T = 1: pair blocks; T <= its BLOCK_T by token bucket: the
    alignment kernel's layout) and quantizes x for fp8 schemes: bitwise topk_route + fused_experts over token
    counts on both sides of the bucket edges, E from 3 to 160 (BLOCK_T 32 down to 8), grouped routing, an
    expert_map (EP: half the experts elsewhere) and on-input weighting."""
    G = G if G and E % G == 0 and E > G else 0
    k = min(k, E if not G else (E // G) * 2)
    E_local = (E + 1) // 2 if mapped else E
    H, I = 32, 16
    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    q13, q2, kw = _weights(E_local, H, I, scheme, dtype=dtype)
    if mapped:  # global expert e lives here at e // 2 when e is even
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[::2] = torch.arange(E_local, dtype=torch.int32)
        kw.update(expert_map=emap.to(DEV))
    kw.update(apply_router_weight_on_input=on_input)
    route = dict(num_expert_group=G, topk_group=min(2, G) if G else 0)
    torch.manual_seed(T * 1000 + E)
    x = (torch.randn(T, H, device=DEV) * 0.1).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    out = moe.fused_moe(x, logits, q13, q2, k, **route, **kw)
    w, ids = moe.topk_route(logits, k, **route)
    assert torch.equal(out, moe.fused_experts(x, q13, q2, w, ids, **kw)), (T, E, k, G, scheme)


def _count_launches(monkeypatch) -> list:
    """Every kernel launch of the pipeline's modules, recorded as (kernel name, its PAIRS constexpr or None)."""
    from torch_moe_ops._kernels import activation, align, gemm, moe_sum, plan, routing

    names = []

    def counted(kernel, grid, *args, **kw):
        names.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, kw.get("PAIRS")))
        return plan.launch(kernel, grid, *args, **kw)

    for mod in (activation, align, gemm, moe_sum, routing):
        monkeypatch.setattr(mod, "launch", counted)
    return names


def _launches(monkeypatch, fn) -> tuple[list, torch.Tensor]:
    """(the launches ``fn()`` makes, as ``_count_launches`` records them, its output), with a launch plan recorded
    afresh (the switches are read when a plan is recorded) and dropped after."""
    names = _count_launches(monkeypatch)
    moe.clear_launch_plans()
    out = fn()
    moe.clear_launch_plans()
    return names, out


def _gemms_quantize_at_T1(sch, x, q13, k, block) -> tuple[bool, bool]:
    """Whether GEMM1 and GEMM2 at T = 1 quantize their own fp8 input with this device's tiles (always on CPU)."""
    from torch_moe_ops._kernels.configs import get_config
    from torch_moe_ops._kernels.gemm import quantizes_input

    E, N1, H = *q13.shape[:2], x.shape[1]
    cfg1 = get_config(1, E, N1, H, sch, block, x.device, top_k=k, dtype=x.dtype)
    cfg2 = get_config(1, E, H, N1 // 2, sch, block, x.device, top_k=k, dtype=x.dtype, block_m=cfg1.block_m)
    q1, q2 = quantizes_input(sch, block, cfg1), quantizes_input(sch, block, cfg2)
    assert DEV == "cuda" or (q1 and q2), (cfg1, cfg2)
    return q1, q2


@pytest.mark.parametrize("scheme,activation,on_input,want", [
    ("none", "silu", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("int4_w4a16", "swigluoai", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("fp8_block", "silu", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("fp8_channel", "swigluoai", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("fp8_tensor", "silu", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("fp8_channel", "gelu", False, [("_moe_gemm_kernel", 2), ("_moe_gemm_kernel", 1)]),
    ("fp8_channel", "silu_no_mul", False,
     [("_moe_gemm_kernel", 2), ("_act_quant_kernel", None), ("_moe_gemm_kernel", 1)]),
    ("none", "silu", True, [("_topk_route_kernel", None), ("_moe_gemm_kernel", 1), ("_moe_gemm_kernel", 1)]),
    ("fp8_block", "silu", True, [("_topk_route_kernel", None), ("_moe_gemm_kernel", 1), ("_moe_gemm_kernel", 1)]),
])
def test_fused_moe_at_T1_launches_two_kernels(monkeypatch, scheme, activation, on_input, want):
    """fused_moe at T = 1 (docs/kernels.md, "Two launches at T = 1"): GEMM1 routes the token itself (PAIRS = 2) and
    fuses the activation, GEMM2 reads the ids GEMM1 wrote (PAIRS = 1) and sums the slots; no routing, alignment,
    activation or sum launch. fp8 schemes: GEMM1 also quantizes x and GEMM2 the activation's fp32 output (per row;
    fp8_block: per K step, here the group); a non-gated activation keeps act_and_quant; on-input weighting keeps
    the routing kernel (GEMM1's input is weighted per pair). Output bitwise topk_route + fused_experts with the
    activation and the sum unfused (act_and_mul or act_and_quant, moe_sum), an expert_map dropping slots included."""
    from torch_moe_ops._platform import FUSE_ACTIVATION_ENV, FUSE_SUM_ENV

    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    x, logits, q13, q2, k, kw = _mapped_case(scheme, activation, dtype, 1)
    kw.update(apply_router_weight_on_input=on_input)
    k = 3
    w, ids = moe.topk_route(logits, k)
    with monkeypatch.context() as m:
        m.setenv(FUSE_ACTIVATION_ENV, "0")
        m.setenv(FUSE_SUM_ENV, "0")
        moe.clear_launch_plans()
        want_out = moe.fused_experts(x, q13, q2, w, ids, **kw)
    sch = get_quant_scheme(scheme)
    if sch.act is not None:  # each GEMM quantizes its input where a K step is a whole group (always, on CPU)
        quant1, quant2 = _gemms_quantize_at_T1(sch, x, q13, k, kw["block_shape"])
        if not quant2 and ("_act_quant_kernel", None) not in want:
            want = want[:-1] + [("_act_quant_kernel", None), want[-1]]
        if not quant1 and not on_input:
            want = [("_topk_route_kernel", None), ("_moe_gemm_kernel", 1)] + want[1:]
    names, got = _launches(monkeypatch, lambda: moe.fused_moe(x, logits, q13, q2, k, **kw))
    assert names == want
    assert torch.equal(got, want_out)


@pytest.mark.parametrize("scheme,activation", [("none", "silu"), ("fp8_block", "silu"), ("fp8_channel", "swigluoai"),
                                               ("fp8_tensor", "gelu")])
@pytest.mark.parametrize("on_input", [False, True])
def test_fused_experts_at_T1_launches_two_kernels(monkeypatch, scheme, activation, on_input):
    """fused_experts at T = 1: GEMM1 reads the ids (PAIRS = 1), quantizes its input rows for fp8 schemes (x, or
    the weighted copies of on-input weighting) and applies the activation, GEMM2 quantizes the activation's
    fp32 output rows and sums the slots: two launches, bitwise the path where no GEMM quantizes
    (quantize_activation, act_and_quant, GEMM2, moe_sum), an expert_map dropping slots included."""
    from torch_moe_ops._kernels import fused_experts as pipeline
    from torch_moe_ops._platform import FUSE_SUM_ENV

    dtype = torch.bfloat16 if _weight_only(scheme) else torch.float16
    x, logits, q13, q2, k, kw = _mapped_case(scheme, activation, dtype, 1)
    kw.update(apply_router_weight_on_input=on_input)
    w, ids = moe.topk_route(logits, 3)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "quantizes_input", lambda *a: False)
        m.setenv(FUSE_SUM_ENV, "0")
        moe.clear_launch_plans()
        want = moe.fused_experts(x, q13, q2, w, ids, **kw)
    expect = [("_moe_gemm_kernel", 1)] * 2
    sch = get_quant_scheme(scheme)
    if sch.act is not None:
        quant1, quant2 = _gemms_quantize_at_T1(sch, x, q13, 3, kw["block_shape"])
        expect = ([("_act_quant_kernel", None)] * (not quant1) + expect[:1]
                  + [("_act_quant_kernel", None)] * (not quant2) + expect[1:])
    names, got = _launches(monkeypatch, lambda: moe.fused_experts(x, q13, q2, w, ids, **kw))
    assert names == expect
    assert torch.equal(got, want)


@pytest.mark.parametrize("route_kw", [dict(), dict(renormalize=False, routed_scaling_factor=2.5),
                                      dict(scoring_func="sigmoid", num_expert_group=4, topk_group=2, bias=True),
                                      dict(num_expert_group=8, topk_group=3)])
@pytest.mark.parametrize("E,k", [(160, 6), (60, 4), (3, 3)])
def test_gemm1_routes_the_token_with_topk_routes_bits(route_kw, E, k):
    """GEMM1 at T = 1 with ``route``: the weights and ids its program 0 writes are topk_route's, bitwise, for rows
    routed inside a batch of 37 (the routing kernel's BLOCK_T tokens a program, another thread layout): the sums
    add in a fixed tree. NaN, inf and all-NaN rows, grouped and biased routing, E not a power of two."""
    from torch_moe_ops._kernels.configs import TileConfig
    from torch_moe_ops._kernels.gemm import invoke_moe_gemm

    route_kw = dict(route_kw)
    G = route_kw.get("num_expert_group", 0)
    if G and (E % G or E <= G or k > (E // G) * route_kw["topk_group"]):
        pytest.skip("no such grouping")
    torch.manual_seed(E * 10 + k)
    bias = torch.randn(E, device=DEV) * 0.1 if route_kw.pop("bias", False) else None
    logits = torch.randn(37, E, device=DEV) * 3
    logits[3, 1] = float("nan")
    logits[5] = float("nan")
    logits[7, 0], logits[7, -1] = float("inf"), float("-inf")
    routing = (k, route_kw.get("renormalize", True), route_kw.get("scoring_func", "softmax"), G,
               route_kw.get("topk_group", 0), bias, route_kw.get("routed_scaling_factor", 1.0))
    w_batch, ids_batch = moe.topk_route(logits, k, **route_kw, e_score_correction_bias=bias)
    scheme = get_quant_scheme("none")
    H, N = 32, 32
    w13 = torch.randn(E, N, H, device=DEV, dtype=torch.float16)
    for t in (0, 3, 5, 7, 36):
        x = torch.randn(1, H, device=DEV, dtype=torch.float16)
        w, ids = torch.empty(1, k, device=DEV), torch.empty(1, k, dtype=torch.int32, device=DEV)
        c = torch.empty(k, N, dtype=torch.float16, device=DEV)
        invoke_moe_gemm(x, w13, c, None, None, None, top_k=k, config=TileConfig(16, 16, 32, 1, 4, 2),
                        scheme=scheme, pair_ids=(ids, None), route=(logits[t:t + 1], routing, w))
        assert torch.equal(ids, ids_batch[t:t + 1]) and torch.equal(w, w_batch[t:t + 1]), t
        want = (x.float() @ w13[ids[0].long()].float().transpose(1, 2)).squeeze(1)
        torch.testing.assert_close(c.float(), want, rtol=1e-2, atol=1e-2)


def test_routing_kernel_first_when_switched_off(monkeypatch):
    """TORCH_MOE_OPS_FUSE_ROUTING=0: fused_moe at T = 1 launches the routing kernel, then GEMMs that read its ids;
    the same bits as GEMM1's own routing."""
    from torch_moe_ops._platform import FUSE_ROUTING_ENV

    x, logits, q13, q2, k, kw = _mapped_case("none", "silu", torch.float16, 1)
    want = moe.fused_moe(x, logits, q13, q2, 3, **kw)
    monkeypatch.setenv(FUSE_ROUTING_ENV, "0")
    names, got = _launches(monkeypatch, lambda: moe.fused_moe(x, logits, q13, q2, 3, **kw))
    assert names == [("_topk_route_kernel", None), ("_moe_gemm_kernel", 1), ("_moe_gemm_kernel", 1)]
    assert torch.equal(got, want)
