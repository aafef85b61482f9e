"""Weight quantization (docs/design.md §3, §10): ``quantize_weight_into`` fills a ``WeightFormat``'s
storage and scales in place; q and scales match the format's reference ``fmt.quantize`` bit for bit
(``_numerics``: correctly rounded divisions, round half to even).

One kernel per scale granularity (the format's class), each ONE pass over the weights:
- per channel (fp8_channel, int8_channel): a program owns whole rows (``[BLOCK_R, next_pow2(K)]``), so it
  reduces amax and quantizes from the same registers: w is read once and q written once. Rows longer
  than ``_MAX_ROW`` re-read the row (from L2) in a second loop.
- per tile (fp8_block): a program owns one ``[bn, bk]`` tile.
- per group (int4_group): a program owns BLOCK_R rows x NG groups of G along K and writes packed nibbles.
- per tensor (fp8_tensor): ``quant_tensor`` (one launch, two reads of each chunk).

Measured on H100 (torch 2.11, triton 3.6; copy ~3004 GB/s read + write; ``tools/quant_sweep.py``),
~1G-element bf16 w13 tensors, bytes = 2 read + 1 written per element: fp8_channel / int8_channel /
fp8_block ~3070 GB/s (~100% of copy; torch.compile of the same fp8_channel math: 2362 GB/s).
int4_group (H200, triton 3.6, [8, 28672, 4096] bf16, G = 128): 1.96 ms, ~1200 GB/s of 2 B read + 0.5 B
written, against ~3800 GB/s for fp8_channel on the same tensor: correct and one pass, not tuned yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import SCALE_EPS, WeightFormat, cdiv
from ..schemes import INT4_MIN
from ._numerics import _abs_bits, _from_bits, _int4_nibbles, _quantize, _scale_of
from .quant_tensor import per_tensor

_MAX_ROW = 8192  # longest row (in elements, pow2) a program keeps in registers
_GROUP_TILE = 8192  # int4_group: elements per program (rows x groups)


@triton.jit(do_not_specialize=["rows"])
def _quant_weight_row_kernel(
    w_ptr, q_ptr, s_ptr, rows, N, K,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn,
    QMAX: tl.constexpr, EPS: tl.constexpr, INT: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """w: [E, N, K] -> q: [E, N, K], s: [E, N] (one scale per row; rows = E*N flattened)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < rows
    e, n = r // N, r % N
    w_row = w_ptr + e * stride_we + n * stride_wn
    q_row = q_ptr + e * stride_qe + n * stride_qn
    offs_k = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = mask_r[:, None] & (offs_k[None, :] < K)
        x = tl.load(w_row[:, None] + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        scale, inv = _scale_of(_from_bits(tl.max(_abs_bits(x), axis=1)), QMAX, EPS)
        tl.store(q_row[:, None] + offs_k[None, :], _quantize(x, inv[:, None], QMAX, INT, EMULATE_FP8, True), mask=mask)
    else:
        amax = tl.zeros([BLOCK_R], dtype=tl.int32)  # bits of |x|: the integer max keeps NaN
        for k0 in range(0, K, BLOCK_K):
            mask = mask_r[:, None] & (k0 + offs_k[None, :] < K)
            x = tl.load(w_row[:, None] + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(_abs_bits(x), axis=1))
        scale, inv = _scale_of(_from_bits(amax), QMAX, EPS)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_r[:, None] & (k0 + offs_k[None, :] < K)
            x = tl.load(w_row[:, None] + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row[:, None] + k0 + offs_k[None, :], _quantize(x, inv[:, None], QMAX, INT, EMULATE_FP8, True),
                     mask=mask)
    tl.store(s_ptr + e * stride_se + n * stride_sn, scale, mask=mask_r)


@triton.jit
def _quant_weight_block_kernel(
    w_ptr, q_ptr, s_ptr, N, K,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn, stride_sk,
    QMAX: tl.constexpr, EPS: tl.constexpr, INT: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BN_P2: tl.constexpr, BK_P2: tl.constexpr,
):
    """w: [E, N, K] -> q: [E, N, K], s: [E, cdiv(N, BN), cdiv(K, BK)]; grid (k-blocks, n-blocks, E)."""
    pid_k, pid_n, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN_P2)
    offs_k = pid_k * BK + tl.arange(0, BK_P2)
    mask = ((tl.arange(0, BN_P2) < BN) & (offs_n < N))[:, None] & ((tl.arange(0, BK_P2) < BK) & (offs_k < K))[None, :]
    w_off = e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x = tl.load(w_ptr + w_off, mask=mask, other=0.0).to(tl.float32)
    scale, inv = _scale_of(_from_bits(tl.max(tl.max(_abs_bits(x), axis=1), axis=0)), QMAX, EPS)
    q_off = e * stride_qe + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]
    tl.store(q_ptr + q_off, _quantize(x, inv, QMAX, INT, EMULATE_FP8, True), mask=mask)
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, scale)


@triton.jit
def _e2m1_codes(y):
    """fp32 y (already divided by the scale) -> E2M1 codes [0, 16) int32: nearest magnitude of 0, 0.5, 1, 1.5, 2,
    3, 4, 6 (ties to the even code: the midpoints 0.75, 1.75 and 3.5 round up), saturating at 6; bit 3 = sign
    bit of y. NaN -> magnitude code 0 (its group's scale byte is NaN)."""
    a = tl.abs(y)
    code = ((a > 0.25).to(tl.int32) + (a > 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a > 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32) + (a > 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    code += ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(tl.int32)
    return code | (((y.to(tl.int32, bitcast=True) >> 31) & 1) << 3)


@triton.jit(do_not_specialize=["rows"])
def _quant_weight_group_kernel(
    w_ptr, q_ptr, s_ptr, rows, N, groups,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
    G: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr,
    W_CODEC: tl.constexpr,
):
    """Packed groups (int4, mxfp4). w: [E, N, K] -> q uint8: [E, N, K / 2] (element 2j in the low nibble of byte
    j, 2j + 1 in the high one), s: [E, N, K / G] (int4: fp32 amax / 7; mxfp4: E8M0 bytes, OCP MX: docs/design.md
    §3); rows = E*N flattened; grid (row blocks, blocks of NG groups).

    The tile is [BLOCK_R, NG, G / 2, 2]: its last axis is the (even, odd) pair of one byte."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = tl.program_id(1) * NG + tl.arange(0, NG)
    e, n = r // N, r % N
    mask = (r < rows)[:, None] & (grp < groups)[None, :]  # [BLOCK_R, NG]
    byte = grp[:, None] * (G // 2) + tl.arange(0, G // 2)[None, :]  # [NG, G/2]: byte index in the row
    w_row = w_ptr + e * stride_we + n * stride_wn
    ptrs = w_row[:, None, None, None] + (2 * byte)[None, :, :, None] + tl.arange(0, 2)[None, None, None, :]
    x = tl.load(ptrs, mask=mask[:, :, None, None], other=0.0).to(tl.float32)
    amax_bits = tl.max(tl.max(_abs_bits(x), axis=3), axis=2)  # [BLOCK_R, NG]; NaN propagates
    lo, hi = tl.split(x)
    if W_CODEC == "int4":
        scale, inv = _scale_of(_from_bits(amax_bits), QMAX, 0.0)  # no floor
        inv = inv[:, :, None]
        packed = _int4_nibbles(lo, inv, QMIN, QMAX) | (_int4_nibbles(hi, inv, QMIN, QMAX) << 4)
    elif W_CODEC == "fp4_e2m1":
        # scale 2^(floor(log2 amax) - 2): its E8M0 byte is amax's exponent field - 2 (0 for zero / subnormal
        # amax, 254 for inf, 255 for NaN); 1 / scale = 2^(127 - byte) built as bits (2^-127 for byte 254)
        field = (amax_bits >> 23) & 0xFF
        scale = tl.where(amax_bits > 0x7F800000, 255, tl.where(field == 255, 254, tl.maximum(field - 2, 0)))
        inv = tl.where(scale >= 254, 5.877471754111438e-39, ((254 - scale) << 23).to(tl.float32, bitcast=True))
        inv = inv[:, :, None]
        packed = _e2m1_codes(lo * inv) | (_e2m1_codes(hi * inv) << 4)
    else:
        tl.static_assert(False, "no group quantizer for this codec")
    q_row = q_ptr + e * stride_qe + n * stride_qn
    tl.store(q_row[:, None, None] + byte[None, :, :], packed.to(tl.uint8), mask=mask[:, :, None])
    tl.store(s_ptr + e[:, None] * stride_se + n[:, None] * stride_sn + grp[None, :] * stride_sg,
             scale.to(s_ptr.dtype.element_ty), mask=mask)


def _per_row(w, q, scale, codec):
    E, N, K = w.shape
    scale = scale.reshape(E, N)
    k_p2 = triton.next_power_of_2(K)
    one_pass = k_p2 <= _MAX_ROW
    block_k = k_p2 if one_pass else 4096
    block_r = max(1, min(64, _MAX_ROW // block_k)) if one_pass else 1
    _quant_weight_row_kernel[(triton.cdiv(E * N, block_r),)](
        w, q, scale, E * N, N, K,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        **codec, BLOCK_R=block_r, BLOCK_K=block_k, ONE_PASS=one_pass,
        num_warps=8 if block_r * block_k >= 4096 else 4,
    )


def _per_block(w, q, scale, block, codec):
    E, N, K = w.shape
    bn, bk = block
    bn_p2, bk_p2 = triton.next_power_of_2(bn), triton.next_power_of_2(bk)
    _quant_weight_block_kernel[(cdiv(K, bk), cdiv(N, bn), E)](
        w, q, scale, N, K,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        **codec, BN=bn, BK=bk, BN_P2=bn_p2, BK_P2=bk_p2, num_warps=8 if bn_p2 * bk_p2 >= 8192 else 4,
    )


def _per_group(w, q, scale, fmt: WeightFormat, block):
    E, N, K = w.shape
    G = block[1]
    if K % G:
        raise ValueError(f"{fmt.name}: w's K = {K} is not divisible by the group size {G}")
    groups = K // G
    ng = max(1, min(triton.next_power_of_2(groups), _GROUP_TILE // (2 * G)))
    block_r = max(1, min(triton.next_power_of_2(E * N), 64, _GROUP_TILE // (ng * G)))
    _quant_weight_group_kernel[(triton.cdiv(E * N, block_r), triton.cdiv(groups, ng))](
        w, q, scale, E * N, N, groups,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        G=G, QMIN=INT4_MIN, QMAX=fmt.qmax, BLOCK_R=block_r, NG=ng, W_CODEC=fmt.codec.kernel,
        num_warps=8 if block_r * ng * G >= 4096 else 4,
    )


def quantize_weight_into(
    w: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat, block=None, shards: int = 1
) -> None:
    """Quantize ``w`` into preallocated buffers (one launch; plus a memset for per-tensor scales).

    w: [E, N, K] or [N, K] bf16/fp16/fp32, ``stride(-1) == 1`` (other strides may be padded).
    qweight: ``fmt.packed_shape(w.shape)`` in ``fmt.qdtype``, ``stride(-1) == 1``: fp8 (or its uint8
    bytes) / int8 [.., N, K]; int4 uint8 [.., N, K / 2].
    scale: ``fmt.scale_shape`` in ``fmt.scale_dtype``: fp32 per tensor [E, shards], per channel [E, N], fp8_block
    [E, cdiv(N, bn), cdiv(K, bk)], int4_group [E, N, K / G]; mxfp4 uint8 [E, N, K / 32] (no E for 2-D w).
    block: canonical ``fmt.block_shape(...)`` (None for untiled formats). shards: per tensor only (w13:
    gate, up). Arguments arrive validated by the ops layer."""
    if w.dim() == 2:
        w, qweight, scale = w[None], qweight[None], scale[None]
    if qweight.dtype != fmt.qdtype:
        qweight = qweight.view(fmt.qdtype)  # fp8 storage handed in as its uint8 bytes
    assert w.stride(-1) == 1 and qweight.stride(-1) == 1, "last dim must be contiguous"
    E, N, K = w.shape
    if E == 0 or N == 0 or K == 0:
        return
    codec = dict(QMAX=fmt.qmax, EPS=SCALE_EPS, INT=not fmt.qdtype.is_floating_point, EMULATE_FP8=interpret_mode())
    if fmt.quantizer == "rows":
        _per_row(w, qweight, scale, codec)
    elif fmt.quantizer == "groups":
        _per_group(w, qweight, scale, fmt, block)
    elif fmt.quantizer == "blocks":
        _per_block(w, qweight, scale, block, codec)
    elif fmt.quantizer == "tensor":
        per_tensor(w, qweight, scale.reshape(E, shards), shards, codec)
    else:
        raise ValueError(f"no quantization kernel for {fmt!r}")
