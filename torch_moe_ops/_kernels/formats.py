"""The weight formats' Triton side (docs/architecture.md, "Adding a weight format"): how each codec's storage
decodes to values, and the steps the forward GEMM and the backward's dgrad GEMM share.

A codec is named by ``W_CODEC`` (``WeightFormat.codec.kernel``; ``"none"`` = weights in the activation dtype),
its packing by ``W_PACKED`` (two values per byte along K). Decoding gives values that are exact in the
activation dtype (int8, int4) or already in a dot dtype (fp8); the scales are applied by the GEMMs where their
granularity puts them (``GemmFlags``). An unknown codec fails to compile: no branch falls through.

Shared by ``gemm.py`` and ``backward.py``:

- ``swizzle`` / ``block_pairs``: which BLOCK_M rows of ``sorted_ids`` and which column tile a program owns
  (GROUP_M swizzle), its pair indices, their mask and the block's expert (docs/design.md §7); ``pair_rows`` /
  ``pair_expert``: the same for one pair a block at T = 1, its expert id given.
- ``tensor_scale_half``: which of a per-tensor w13's two scales (gate, up) a row of w13 takes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._platform import interpret_mode

#: PTX for the 16-bit decode (``_decode_asm``); the interpreter runs the Triton-level bit tricks instead.
_ASM = tl.constexpr(not interpret_mode())


def _ptx(text: str) -> tl.constexpr:
    """An asm block as a one-line constexpr: Inductor copies a kernel's global constexprs into its generated source
    as repr() inside a triple-quoted string, where a newline's escape breaks the literal (triton compile mode,
    H100, 2026-12-07)."""
    return tl.constexpr(" ".join(text.split()))


# Four packed bytes w = [B3 B2 B1 B0] -> four 32-bit registers of two bf16 each: lo = (B1, B0 | B3, B2) low
# nibbles, hi = the same of the high nibbles. prmt spreads two bytes into the 16-bit lanes of t01 / t23; fp4
# masks a nibble, and one multiply moves its three magnitude bits to bf16 bits 8..6 and its sign to bit 15 (the
# two shifted copies touch disjoint bits, so the product is their OR); int4 flips bit 3 and puts the nibble in
# the mantissa of 128. tests/_kernels/test_decode_asm.py runs these strings through an emulator.
_FP4_BF16_PTX = _ptx("""{
.reg .b32 z, t01, t23, m;
mov.b32 z, 0;
prmt.b32 t01, $4, z, 0x4140;
prmt.b32 t23, $4, z, 0x4342;
and.b32 m, t01, 0x000F000F; mul.lo.u32 m, m, 0x1040; and.b32 $0, m, 0x81C081C0;
and.b32 m, t23, 0x000F000F; mul.lo.u32 m, m, 0x1040; and.b32 $1, m, 0x81C081C0;
and.b32 m, t01, 0x00F000F0; mul.lo.u32 m, m, 0x104; and.b32 $2, m, 0x81C081C0;
and.b32 m, t23, 0x00F000F0; mul.lo.u32 m, m, 0x104; and.b32 $3, m, 0x81C081C0;
}""")
_INT4_BF16_PTX = _ptx("""{
.reg .b32 z, x, t01, t23;
mov.b32 z, 0;
xor.b32 x, $4, 0x88888888;
prmt.b32 t01, x, z, 0x4140;
prmt.b32 t23, x, z, 0x4342;
and.b32 $0, t01, 0x000F000F; or.b32 $0, $0, 0x43004300;
and.b32 $1, t23, 0x000F000F; or.b32 $1, $1, 0x43004300;
shr.b32 t01, t01, 4; and.b32 $2, t01, 0x000F000F; or.b32 $2, $2, 0x43004300;
shr.b32 t23, t23, 4; and.b32 $3, t23, 0x000F000F; or.b32 $3, $3, 0x43004300;
}""")


_INT4_FP16_PTX = _ptx(_INT4_BF16_PTX.value.replace("0x43004300", "0x64006400"))  # 1024 + nibble ^ 8


@triton.jit
def _decode_asm(packed, W_CODEC: tl.constexpr, DT: tl.constexpr):
    """``decode_pairs`` for 16-bit dots in PTX, four bytes at a time: the same bits in fewer instructions
    (docs/kernels.md "Decoding 4-bit values"). fp4 (bf16 only): value · 2^-126 (the caller rescales); int4:
    nibble ^ 8 in the mantissa of 128 (bf16) / 1024 (fp16) (the caller subtracts 136 / 1032)."""
    if W_CODEC == "int4" and DT == tl.float16:
        return tl.inline_asm_elementwise(_INT4_FP16_PTX, "=r,=r,=r,=r,r", [packed],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif W_CODEC == "int4":
        return tl.inline_asm_elementwise(_INT4_BF16_PTX, "=r,=r,=r,=r,r", [packed],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        tl.static_assert(DT == tl.bfloat16, "the PTX fp4 decode is bf16's")
        return tl.inline_asm_elementwise(_FP4_BF16_PTX, "=r,=r,=r,=r,r", [packed],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def decode_pairs(packed, W_CODEC: tl.constexpr, DT: tl.constexpr):
    """Packed bytes ``[..., BK/2, BN]`` (element 2j of K in byte j's low half) -> (even-k values, odd-k values)
    in ``DT`` (the dot's dtype: bf16, fp16 or fp32), exact. Built from bits with a few integer ops and one
    packed float op a value (docs/kernels.md "Decoding 4-bit values"): a decode GEMM's K loop spends its
    issue slots here."""
    b = packed.to(tl.int32)
    if DT == tl.float32:
        if W_CODEC == "int4":  # nibble ^ 8 in the mantissa of 2^23 (one ulp = 1), minus 2^23 + 8
            lo = (((b ^ 0x8) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            hi = ((((b >> 4) ^ 0x8) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            return lo, hi
        elif W_CODEC == "fp4_e2m1":  # sign, exponent and mantissa bits in fp32's places: value · 2^-126
            lo = (((b & 0x8) << 28) | ((b & 0x7) << 22)).to(tl.float32, bitcast=True)
            hi = (((b & 0x80) << 24) | ((b & 0x70) << 18)).to(tl.float32, bitcast=True)
            return lo * 8.507059173023462e+37, hi * 8.507059173023462e+37  # 2^126, exact (subnormals kept)
        else:
            tl.static_assert(False, "unknown packed weight codec (add its branch to decode_pairs)")
    else:  # 16-bit lanes: the float op runs two values at a time
        tl.static_assert((DT == tl.bfloat16) or (DT == tl.float16), "decode_pairs: bf16, fp16 or fp32 dots")
        BF16: tl.constexpr = DT == tl.bfloat16
        if _ASM and (W_CODEC == "int4" or (W_CODEC == "fp4_e2m1" and BF16)):
            lo, hi = _decode_asm(packed, W_CODEC, DT)
            if W_CODEC == "int4":
                off = tl.full((), 136.0 if BF16 else 1032.0, DT)
                return lo - off, hi - off
            else:
                f = tl.full((), 8.507059173023462e+37, DT)  # 2^126
                return lo * f, hi * f
        elif W_CODEC == "int4":  # nibble ^ 8 as the low mantissa bits of 128 (bf16) / 1024 (fp16), minus 136 / 1032
            magic = 0x4300 if BF16 else 0x6400
            lo = (((b ^ 0x8) & 0xF) | magic).to(tl.int16).to(DT, bitcast=True)
            hi = ((((b >> 4) ^ 0x8) & 0xF) | magic).to(tl.int16).to(DT, bitcast=True)
            off = tl.full((), 136.0 if BF16 else 1032.0, DT)
            return lo - off, hi - off
        elif W_CODEC == "fp4_e2m1":  # value · 2^-126 (bf16: fp32's exponent) or · 2^-14 (fp16), then rescaled
            if BF16:
                lo = ((b & 0x8) << 12) | ((b & 0x7) << 6)
                hi = ((b & 0x80) << 8) | ((b & 0x70) << 2)
                f = tl.full((), 8.507059173023462e+37, DT)  # 2^126
            else:
                lo = ((b & 0x8) << 12) | ((b & 0x7) << 9)
                hi = ((b & 0x80) << 8) | ((b & 0x70) << 5)
                f = tl.full((), 16384.0, DT)  # 2^14
            return lo.to(tl.int16).to(DT, bitcast=True) * f, hi.to(tl.int16).to(DT, bitcast=True) * f
        else:
            tl.static_assert(False, "unknown packed weight codec (add its branch to decode_pairs)")


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
def stored_value_scales(s, W_CODEC: tl.constexpr, DT: tl.constexpr):
    """Stored group scales -> the dtype ``scale_values`` multiplies in: mxfp4's powers of two in the dot's dtype
    ``DT`` when that is exact (bf16 / fp32: fp32's exponent range), else fp32 (fp16's range is narrower; other
    codecs' scales are not powers of two). mxfp4 in bf16 comes straight from the E8M0 byte (the exponent field
    ``s << 7``; 0 and 255 add the top mantissa bit: 2^-127, NaN): the bits of ``decode_scale(s).to(bf16)``
    without the fp32 detour. Convert before broadcasting: once per group, not per value."""
    if W_CODEC == "fp4_e2m1" and DT == tl.bfloat16:
        b = s.to(tl.int32)
        bits = (b << 7) | tl.where((b == 0) | (b == 255), 0x40, 0)
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif W_CODEC == "fp4_e2m1" and DT != tl.float16:
        return decode_scale(s, W_CODEC).to(DT)
    else:
        return decode_scale(s, W_CODEC)


@triton.jit
def scale_values(v, s):
    """Decoded values ``v`` (the dot's dtype) times their scales from ``stored_value_scales``, in the dot's dtype:
    two at a time and exact when ``s`` is in v's dtype, else in fp32 and rounded once."""
    if s.dtype == v.dtype:
        return v * s
    else:
        return (v.to(tl.float32) * s).to(v.dtype)


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
def pair_expert(raw, map_ptr, E_IDS, E_LOCAL, HAS_MAP: tl.constexpr):
    """Expert id ``raw`` (scalar, any int dtype) -> its local expert (int64; through ``map_ptr`` [E_IDS] int32 when
    HAS_MAP), −1 when outside [0, E_IDS) or [0, E_LOCAL): ``align``'s rule for dropped pairs, and ``moe_sum``'s
    (``sum_slots``). The bounds may be runtime values or constexprs."""
    valid = (raw >= 0) & (raw < E_IDS)  # in the ids' own dtype (int64 ids stay safe)
    e = tl.where(valid, raw, 0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(map_ptr + e)
    return tl.where(valid & (e >= 0) & (e < E_LOCAL), e, -1).to(tl.int64)


@triton.jit
def pair_rows(pid_m, num_valid, BLOCK_M: tl.constexpr):
    """``block_pairs``' rows for pair ``pid_m`` alone at row 0 of row block ``pid_m`` (T = 1): (offs_token [BM]
    int64, mask_token [BM]). No pointer argument: torch.compile takes a helper's pointers as written when a store
    address derives from its result."""
    rows = tl.arange(0, BLOCK_M)
    offs_token = tl.where(rows == 0, pid_m, num_valid).to(tl.int64)
    return offs_token, offs_token < num_valid


@triton.jit
def tensor_scale_half(rows, num_rows, INTERLEAVED: tl.constexpr):
    """Row index of w13 (``[N1, ...]``) -> 0 (gate) or 1 (up): even/odd rows interleaved, else the halves."""
    if INTERLEAVED:
        return rows % 2
    else:
        return (rows >= num_rows // 2).to(tl.int32)
