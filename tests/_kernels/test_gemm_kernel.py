"""The grouped GEMM (``_kernels.gemm.invoke_moe_gemm``) on its own: -1 blocks and the tail, and the int4
path (nibble unpack, per-group scales, BLOCK_K rules) against ``a[j // k] @ dequantize(w)[e]ᵀ``. GPU, or
CPU through the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels.align import align_block_size  # noqa: E402
from torch_moe_ops._kernels.configs import TileConfig  # noqa: E402
from torch_moe_ops._kernels import gemm  # noqa: E402
from torch_moe_ops._kernels.gemm import invoke_moe_gemm  # noqa: E402
from torch_moe_ops.schemes import NONE, get_quant_scheme  # noqa: E402

from ._experts import DEVICE, DTYPES, INT4  # noqa: E402


def test_gemm_minus_one_block_stores_zeros_and_skips_tail():
    """A block whose expert is -1 writes zeros; blocks past num_post_pad and sentinel rows are untouched."""
    cfg = TileConfig(16, 32, 32, 1, 4, 1)
    T, k, N, K, E = 5, 2, 40, 40, 2
    numel = T * k
    a = torch.randn(T, K, device=DEVICE)
    w = torch.randn(E, N, K, device=DEVICE)
    sorted_ids = torch.full((numel + E * 15,), numel, dtype=torch.int32, device=DEVICE)
    sorted_ids[:4] = torch.tensor([0, 3, 4, 9], dtype=torch.int32)  # expert 1
    sorted_ids[16:19] = torch.tensor([1, 2, 5], dtype=torch.int32)  # kept non-local pairs: expert -1
    sorted_ids[32:34] = torch.tensor([6, 7], dtype=torch.int32)  # past num_post_pad: never touched
    expert_ids = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE)
    num_post_pad = torch.tensor([32], dtype=torch.int32, device=DEVICE)
    c = torch.full((numel, N), float("nan"), device=DEVICE)
    invoke_moe_gemm(a, w, c, sorted_ids, expert_ids, num_post_pad, top_k=k, config=cfg, scheme=NONE)
    c = c.cpu()
    expect = a.cpu()[torch.tensor([0, 3, 4, 9]) // k] @ w.cpu()[1].T
    torch.testing.assert_close(c[[0, 3, 4, 9]], expect, atol=1e-4, rtol=1e-4)
    assert (c[[1, 2, 5]] == 0).all()
    assert c[[6, 7, 8]].isnan().all()


def _packed_gemm(a, q, s, scheme, block, k, bk, bm=16, w_round=None):
    """GEMM1 addressing (row j // k of a) on random top-k routing over q's E experts, bm x 32 x bk tiles:
    (c [T·k, N] in a's dtype, NaN-poisoned first; the fp32 reference a[j // k] @ dequantize(q, s)[e]ᵀ, the
    dequantized weights rounded to ``w_round`` first when given: what scaling before the dot does)."""
    T, (E, N, _) = a.shape[0], q.shape
    _, ids = torch.rand(T, E).topk(k, dim=-1)
    ids = ids.to(torch.int32)
    cfg = TileConfig(bm, 32, bk, 1, 4, 1)
    c = torch.full((T * k, N), float("nan"), dtype=a.dtype, device=DEVICE)
    align = align_block_size(ids.to(DEVICE), E, cfg.block_m)
    invoke_moe_gemm(a.to(DEVICE), q.to(DEVICE), c, *align, top_k=k, config=cfg, scheme=scheme, w_scale=s.to(DEVICE),
                    block=block)
    w_ref = scheme.weight.dequantize(q, s, block)  # [E, N, K] fp32
    if w_round is not None:
        w_ref = w_ref.to(w_round).float()
    j = torch.arange(T * k)
    return c.cpu(), torch.einsum("jk,jnk->jn", a.float()[j // k], w_ref[ids.view(-1).long()])


@pytest.mark.parametrize("G,bk,dtype,K", [(32, 32, "bf16", 64), (32, 32, "fp32", 64), (64, 32, "fp16", 128),
                                          (128, 32, "fp32", 256), (128, 64, "bf16", 256), (128, 128, "bf16", 256),
                                          (32, 64, "bf16", 96), (32, 128, "fp32", 160), (64, 128, "fp16", 192),
                                          (32, 128, "bf16", 64)])
def test_gemm_int4_unpacks_nibbles_and_scales_each_group(G, bk, dtype, K):
    """Every byte value (so every nibble, -8 included), random per-group scales, BLOCK_K < G (several K
    steps per group), BLOCK_K = G and BLOCK_K = n·G (scales applied before the dot; a K tail of whole groups,
    K < BLOCK_K; fp16 falls back to BLOCK_K = G); N not a multiple of BLOCK_N. Against
    a[j // k] @ dequantize(w)[e]ᵀ, whose weights are rounded to bf16 where the kernel scales before the dot in
    bf16 (docs/kernels.md: value · scale rounds to the activation dtype, ≤ 2⁻⁹ relative; on the GPU that
    rounding alone moves outputs of this size by up to ~0.2, past the tolerance of an unrounded reference)."""
    dt = DTYPES[dtype]
    T, k, E, N = 9, 2, 3, 40
    fmt = INT4.weight
    a = torch.randn(T, K).to(dt)
    q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8)
    q.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every byte value at least once
    s = torch.rand(E, N, K // G) + 0.1
    rounds = bk > G and dt == torch.bfloat16 and DEVICE == "cuda"  # the interpreter's bf16 casts keep fp32 bits
    c, ref = _packed_gemm(a, q, s, INT4, (1, G), k, bk, w_round=dt if rounds else None)
    assert {int(v) for v in fmt.codec.decode(q).unique()} == set(range(-8, 8))
    tol = dict(atol=1e-4, rtol=1e-5) if dt == torch.float32 else dict(atol=0.05, rtol=1e-2)
    torch.testing.assert_close(c.float(), ref, **tol)


def test_gemm_int4_refuses_block_k_not_dividing_the_group_or_too_small():
    E, N, K = 2, 32, 64
    a = torch.randn(4, K, device=DEVICE)
    q = torch.zeros(E, N, K // 2, dtype=torch.uint8, device=DEVICE)
    s = torch.ones(E, N, K // 32, device=DEVICE)
    ids = torch.zeros(4, 1, dtype=torch.int32, device=DEVICE)
    c = torch.empty(4, N, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_K=96 must divide .* or be a multiple of it"):
        invoke_moe_gemm(a, q, c, *align_block_size(ids, E, 16), top_k=1, config=TileConfig(16, 32, 96, 1, 4, 1),
                        scheme=INT4, w_scale=s, block=(1, 64))
    with pytest.raises(ValueError, match="BLOCK_K=16 must be a multiple of 32"):  # two K/2 dots need K >= 16 each
        invoke_moe_gemm(a, q, c, *align_block_size(ids, E, 16), top_k=1, config=TileConfig(16, 32, 16, 1, 4, 1),
                        scheme=INT4, w_scale=s, block=(1, 32))


@pytest.mark.parametrize("bm,bk,dtype,K", [(16, 32, "bf16", 96), (16, 64, "bf16", 96), (16, 128, "bf16", 160),
                                           (16, 128, "fp32", 128), (16, 64, "fp16", 128), (64, 64, "bf16", 160),
                                           (64, 32, "fp16", 96), (16, 128, "bf16", 64)])
def test_gemm_mxfp4_decodes_every_code_and_scale_byte(bm, bk, dtype, K):
    """mxfp4: every E2M1 byte, E8M0 scale bytes over a wide range (2^-20 .. 2^10, fp16 2^2; 0 = 2^-127, 255 = NaN),
    BLOCK_K = G (scale after the dot) and n·G (scale before it, exact for powers of two), a K tail of whole
    groups, BLOCK_M 64 (one dot a K step: JOIN_K). Against a[j // k] @ dequantize(w)[e]ᵀ in fp32."""
    mx = get_quant_scheme("mxfp4")
    dt = DTYPES[dtype]
    T, k, E, N = 7, 2, 3, 40
    a = torch.randn(T, K).to(dt)
    q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8)
    q.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    top = 3 if dt == torch.float16 else 11  # fp16 outputs overflow past ~2^4 scales
    s = torch.randint(127 - 20, 127 + top, (E, N, K // 32), dtype=torch.uint8)
    s.view(-1)[0] = 0
    s[:, 3, -1] = 255  # NaN: output column 3 of every pair is NaN, as in the reference
    c, ref = _packed_gemm(a, q, s, mx, (1, 32), k, bk, bm)
    nan = ref.isnan()
    assert nan.any() and torch.equal(c.float().isnan(), nan)
    c, ref = c.float()[~nan], ref[~nan]
    err = (c - ref).norm() / ref.norm()
    assert err < (1e-6 if dt == torch.float32 else 4e-3), err  # only the output's rounding (and fp32 sums)


@pytest.mark.parametrize("scheme,G,bk,K", [("int4_w4a16", 128, 64, 256), ("int4_w4a16", 64, 32, 192),
                                          ("int4_w4a16", 32, 128, 160), ("mxfp4", 32, 64, 96),
                                          ("mxfp4", 32, 128, 128)])
def test_packed_scales_loaded_a_step_ahead_keep_the_bits(monkeypatch, scheme, G, bk, K):
    """Decode tiles (16 rows) load the next K step's group scales a step ahead: one [BN] scale a step (BLOCK_K <= G)
    or [BK/G, BN] (BLOCK_K = n·G, K tails masked): bitwise the in-step loads (TORCH_MOE_OPS_LOAD_AHEAD=0; 2: the [BK/G, BN] scales too)."""
    from torch_moe_ops._platform import LOAD_AHEAD_ENV

    sch = get_quant_scheme(scheme)
    T, k, E, N = 5, 2, 3, 40
    a = torch.randn(T, K).to(torch.bfloat16)
    q = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8)
    s = torch.randint(120, 130, (E, N, K // G), dtype=torch.uint8) if sch.weight.name == "mxfp4" else \
        torch.rand(E, N, K // G) + 0.1
    outs = []
    for flag in ("1", "2", "0"):
        monkeypatch.setenv(LOAD_AHEAD_ENV, flag)
        torch.manual_seed(1)  # the same routing
        outs.append(_packed_gemm(a, q, s, sch, (1, G), k, bk)[0])
    assert outs[0].isfinite().all() and all(torch.equal(outs[0], o) for o in outs[1:])


def _swap_case(scheme_name, G, dtype, bm, bk, K, swap, monkeypatch, extras):
    """One GEMM1 launch with 16 x 32 x bk-ish tiles: (c [T·k, N or N/2]) with the switch as given; ``extras``:
    biases, an expert_map hole, the routing weight, or the fused activation."""
    from torch_moe_ops._platform import SWAP_AB_ENV
    from torch_moe_ops.reference.quant import quantize_weight
    from torch_moe_ops.schemes import get_activation

    torch.manual_seed(0)
    sch = get_quant_scheme(scheme_name)
    T, k, E, N = 7, 2, 3, 48
    a = (torch.randn(T, K) * 0.5).to(dtype).to(DEVICE)
    q, s = quantize_weight(torch.randn(E, N, K) * 0.3, sch.weight.name, block_shape=[1, G] if G else None)
    block = sch.block_shape([1, G] if G else None) if sch.tiled else None
    emap = torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=DEVICE) if extras else None
    ids = torch.rand(T, E + (emap is not None)).topk(k, dim=-1)[1].to(torch.int32)
    act = (get_activation("silu"), 1.0, 0.0) if extras == "act" else None
    c = torch.full((T * k, N // 2 if act else N), float("nan"), dtype=dtype, device=DEVICE)
    monkeypatch.setenv(SWAP_AB_ENV, "1" if swap else "0")
    monkeypatch.setattr(gemm, "swaps", lambda *a, **kw: swap)  # unswapped too where the default would swap
    invoke_moe_gemm(a, q.to(DEVICE), c, *align_block_size(ids.to(DEVICE), E + (emap is not None), bm, emap), top_k=k,
                    config=TileConfig(bm, 32, bk, 1, 4, 1), scheme=sch, w_scale=sch.canonical_scale(s).to(DEVICE),
                    bias=torch.randn(E, N, device=DEVICE) if extras else None, block=block, act=act,
                    topk_weights=torch.rand(T, k, device=DEVICE) if extras == "weights" else None)
    return c.cpu()


@pytest.mark.parametrize("scheme,G,bk,K", [("int8_w8a16", None, 32, 80), ("int4_w4a16", 32, 32, 128),
                                          ("int4_w4a16", 32, 128, 96), ("int4_w4a16", 64, 64, 128),
                                          ("mxfp4", None, 32, 64), ("mxfp4", None, 128, 96)])
@pytest.mark.parametrize("bm", [16, 64])  # 64 rows: mxfp4 joins its half-K dots unswapped (configs.joins_k)
@pytest.mark.parametrize("extras", [None, "weights", "act"])
def test_swapped_operands_cover_every_k_step_form(scheme, G, bk, K, bm, extras, monkeypatch):
    """TORCH_MOE_OPS_SWAP_AB=1 against the unswapped GEMM for each K-step form: scales after the dot (BLOCK_K <=
    G) or before it (BLOCK_K > G), a K tail, joined and split half-K dots, int8's cast; with biases, an
    expert_map hole, the routing weight or the fused activation. Bitwise in the interpreter; to 1e-2 on a GPU."""
    want = _swap_case(scheme, G, torch.bfloat16, bm, bk, K, False, monkeypatch, extras)
    got = _swap_case(scheme, G, torch.bfloat16, bm, bk, K, True, monkeypatch, extras)
    assert not want.isnan().all()
    if DEVICE == "cpu":
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    else:
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, equal_nan=True)
