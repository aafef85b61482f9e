"""Shared ``@triton.jit`` numerics of the quantizing kernels (docs/design.md §3): scales, rounding, packing.

Every scale is a correctly rounded fp32 division (``div_rn``) and every integer rounding is half-to-even,
so the kernels match the registry's reference quantizers (``torch_moe_ops.schemes``) bit for bit. The
format constants (QMAX, the scale floor EPS, the int4 range) arrive as constexprs from the format
objects; none is spelled here.

The interpreter's fp32 -> fp8 cast mis-rounds (e.g. 127.4 -> 64) and its fp32 -> bf16 cast truncates, so
under ``TRITON_INTERPRET=1`` values are first rounded to the target grid in fp32 (``_fp8_round``,
``_bf16_round``) and the cast is then exact. On GPUs the hardware conversions (round to nearest even) run.

Non-finite values (docs/design.md §3): ``tl.max`` and ``tl.clamp`` drop NaN (a NaN element would get a
finite scale and a finite q), so amax is an integer max of the bits of |x| (``_abs_bits``: NaN bits lie
above +inf, the max propagates it), the scale floor and the fp8 clamp keep NaN, and a NaN row, block or
group ends with a NaN scale. Weights (``SATURATE``) map ±inf to ±QMAX under their inf scale; activations
keep the reference's inf · 0 = NaN.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(y):
    """fp32 |y| < 2**22 -> the nearest integer (still fp32), ties to even: 1.5 * 2**23 added and removed."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _fp8_round(y):
    """Round fp32 (|y| <= 448) to the nearest e4m3fn value, ties to even; exact in fp32 (interpreter only)."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormal e4m3 values share the 2^-9 quantum
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(y / quantum) * quantum
    return tl.where(r == 0.0, y * 0.0, r)  # keep the sign of zero


@triton.jit
def _fp8_cast_emulated(y):
    """fp32 (|y| <= 448, or NaN) -> e4m3fn, exactly (interpreter only: its cast mis-rounds and turns NaN
    into 384, so the value is rounded in fp32 first and NaN is written as its byte 0x7F)."""
    q = _fp8_round(y).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(y != y, 0x7F, q).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _upcast_emulated(v):
    """bf16 / fp8 e4m3fn -> fp32 for the interpreter's dots (it multiplies raw bf16 bits and decodes the
    e4m3 NaN byte as 480)."""
    f = v.to(tl.float32)
    if v.dtype == tl.float8e4nv:
        f = tl.where((v.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), f)
    return f


@triton.jit
def _bf16_round(y):
    """Round fp32 to the nearest bf16 value, ties to even (interpreter only: its bf16 cast truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _abs_bits(x):
    """fp32 -> the int32 bits of |x|. For non-negative floats integer order is float order and every NaN
    lies above +inf, so an integer max of these is amax with NaN propagated (docs/design.md §3)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _from_bits(bits):
    """int32 bits -> fp32 (the inverse of ``_abs_bits`` for non-negative values)."""
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr, EPS: tl.constexpr):
    """amax fp32 -> (scale, 1/scale), both correctly rounded like the torch reference.

    EPS > 0: ``scale = max(amax, EPS) / QMAX`` (fp8, int8). EPS == 0 (int4): no floor; an all-zero group
    gets scale 0 and 1/scale is taken as 0 (q = 0, never NaN). A NaN amax gives a NaN scale (the floor
    keeps NaN), an infinite one an inf scale with 1/scale = 0."""
    if EPS > 0:
        amax = tl.maximum(amax, EPS, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    one = tl.full(amax.shape, 1.0, tl.float32)
    if EPS > 0:
        inv = tl.math.div_rn(one, scale)
    else:
        inv = tl.where(scale > 0.0, tl.math.div_rn(one, tl.where(scale > 0.0, scale, one)), 0.0)
    return scale, inv


@triton.jit
def _scaled(x, inv, SATURATE: tl.constexpr):
    """x * inv; with SATURATE (weights) an infinite x keeps its infinity (its scale is inf, inv = 0 and
    inf * 0 would be NaN), so the clamp that follows saturates it with its sign (docs/design.md §3)."""
    y = x * inv
    if SATURATE:
        y = tl.where(tl.abs(x) == float("inf"), x, y)
    return y


@triton.jit
def _quantize(x, inv, QMAX: tl.constexpr, INT: tl.constexpr, EMULATE_FP8: tl.constexpr, SATURATE: tl.constexpr):
    """x fp32 * inv (broadcast) -> int8 (INT: round half even, clamp ±QMAX) or fp8 e4m3fn (clamp ±QMAX,
    NaN kept: e4m3 holds it). SATURATE: ±inf -> ±QMAX (weights); else inf * 0 = NaN like the reference."""
    y = _scaled(x, inv, SATURATE)
    if INT:  # NaN cannot be stored: its row's scale is NaN, which is what shows in the output
        y = tl.clamp(y, -QMAX, QMAX)  # clamping before rounding is equivalent: ±QMAX are integers
        q = _round_half_even(y).to(tl.int8)
    else:
        y = tl.clamp(y, -QMAX, QMAX, propagate_nan=tl.PropagateNan.ALL)
        if EMULATE_FP8:
            q = _fp8_cast_emulated(y)
        else:
            q = y.to(tl.float8e4nv)
    return q


@triton.jit
def _int4_nibbles(x, inv, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """x fp32 * inv -> the two's-complement nibble (int32 in [0, 16)) of round_half_even, clamped to [QMIN, QMAX]
    (±inf saturate to QMAX / QMIN; a NaN group's scale is NaN)."""
    q = _round_half_even(tl.clamp(_scaled(x, inv, True), QMIN, QMAX)).to(tl.int32)
    return q & 0xF
