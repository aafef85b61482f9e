"""The weight formats' Triton side (docs/architecture.md, "Adding a weight format"): how each codec's storage
decodes to values, and the steps the forward GEMM and the backward's dgrad GEMM share.

A codec is named by ``W_CODEC`` (``WeightFormat.codec.kernel``; ``"none"`` = weights in the activation dtype),
its packing by ``W_PACKED`` (two values per byte along K). Decoding gives values that are exact in the
activation dtype (int8, int4) or already in a dot dtype (fp8); the scales are applied by the GEMMs where their
granularity puts them (``GemmFlags``). An unknown codec fails to compile: no branch falls through.

Shared by ``gemm.py`` and ``backward.py``:

- ``swizzle`` / ``block_pairs``: which BLOCK_M rows of ``sorted_ids`` and which column tile a program owns
  (GROUP_M swizzle), its pair indices, their mask and the block's expert (docs/design.md §7).
- ``tensor_scale_half``: which of a per-tensor w13's two scales (gate, up) a row of w13 takes.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_pairs(packed, W_CODEC: tl.constexpr):
    """Packed bytes ``[..., BK/2, BN]`` (element 2j of K in byte j's low half) -> (even-k values, odd-k values),
    each exact in the activation dtype."""
    if W_CODEC == "int4":  # two's complement nibbles; the int8 casts keep the shifts arithmetic
        b = packed.to(tl.int8, bitcast=True)
        lo = (b << 4).to(tl.int8) >> 4
        hi = b >> 4
        return lo.to(tl.int8), hi.to(tl.int8)
    elif W_CODEC == "fp4_e2m1":
        b = packed.to(tl.int32)
        return _fp4_e2m1(b & 0xF), _fp4_e2m1(b >> 4)
    else:
        tl.static_assert(False, "unknown packed weight codec (add its branch to decode_pairs)")


@triton.jit
def decode_element(packed, odd, W_CODEC: tl.constexpr):
    """Packed bytes gathered per element and the int32 ``odd`` flag (element c in byte c // 2, high half when
    odd) -> the element's value (int32 for integer codecs)."""
    nib = (packed.to(tl.int32) >> (odd * 4)) & 0xF
    if W_CODEC == "int4":
        return (nib ^ 8) - 8
    elif W_CODEC == "fp4_e2m1":
        return _fp4_e2m1(nib)
    else:
        tl.static_assert(False, "unknown packed weight codec (add its branch to decode_element)")


@triton.jit
def decode_scale(s, W_CODEC: tl.constexpr):
    """Stored weight scales -> fp32: fp32 scales as they are; mxfp4's E8M0 bytes ``2^(s - 127)`` (255: NaN)."""
    if W_CODEC == "fp4_e2m1":
        b = s.to(tl.int32)
        v = (b << 23).to(tl.float32, bitcast=True)  # the exponent field alone: 2^(b - 127) for b in [1, 254]
        v = tl.where(b == 0, 5.877471754111438e-39, v)  # 2^-127, an fp32 subnormal
        return tl.where(b == 255, float("nan"), v)
    else:
        return s


@triton.jit
def _fp4_e2m1(code):
    """int32 E2M1 codes [0, 16) -> fp32 values, built as fp32 bits: sign = bit 3, exponent e = bits 1-2,
    mantissa m = bit 0; e = 0: m · 0.5; else (1 + m/2) · 2^(e - 1). Exact in bf16 / fp16 too."""
    e = (code >> 1) & 3
    m = code & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def swizzle(num_cols, num_pid_m, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The program's (pid_m, pid_n): GROUP_M swizzle, so consecutive programs share a column band of one
    expert's weights in L2."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def block_pairs(sorted_ids_ptr, expert_ids_ptr, pid_m, num_post_pad, num_valid, BLOCK_M: tl.constexpr):
    """A live row block's (offs_token [BM] int64 pair indices, mask_token [BM], expert int64; −1: non-local
    pairs). Callers return first for blocks with ``pid_m·BLOCK_M >= num_post_pad``."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] slots of sorted_ids
    offs_token = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < num_post_pad, other=num_valid).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return offs_token, offs_token < num_valid, expert


@triton.jit
def tensor_scale_half(rows, num_rows, INTERLEAVED: tl.constexpr):
    """Row index of w13 (``[N1, ...]``) -> 0 (gate) or 1 (up): even/odd rows interleaved, else the halves."""
    if INTERLEAVED:
        return rows % 2
    else:
        return (rows >= num_rows // 2).to(tl.int32)
