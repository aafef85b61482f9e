"""Activations between the GEMMs (docs/design.md §6), fused with fp8 quantization (§3), and the activation
quantization itself (``quantize_activation`` = the identity activation + quantize).

All math is fp32. The kernels take the ``Activation`` object as constexprs: ``ACT`` (its ``kernel``
name, a string constexpr), ``GATED``, ``INTERLEAVED``, ``SWIGLU_OAI`` and ``CLAMP``. Gated activations
read ``x: [M, 2I]`` in the halves layout (gate = columns ``[0, I)``, up = ``[I, 2I)``) or interleaved
(gate = even, up = odd columns; loaded as one ``[..., 2]`` vector and split). ``limit > 0`` clamps the
gate from above and the up half on both sides (clamped swiglu) for every gated activation. Rows may be
strided (``stride(-1) == 1``); the row count is never specialized.

NaN propagates like the reference (docs/design.md §3, §6): the clamps and relu2 use NaN-propagating
min/max, and the quantized rows take their amax from the bits of |y| (``_numerics``), so a NaN element
gives its row (per token) or group a NaN scale and NaN values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import FP8_DTYPE, FP8_MAX, IDENTITY, SCALE_EPS, Activation, ActivationQuant, cdiv
from ._numerics import _abs_bits, _bf16_round, _from_bits, _quantize, _scale_of
from .plan import launch

_ONE_PASS_MAX = 8192  # per-token quantization keeps rows up to this many outputs (pow2) in registers


@triton.jit
def _elementwise(x, ACT: tl.constexpr):
    """(f(x), f'(x)) in fp32 for the elementwise function ``ACT`` (``Activation.kernel``; its torch twin is the
    registry's ``fn`` / ``grad``). f is written like the torch reference (within an ulp or two); a caller that
    drops f' pays nothing (dead code). An unknown name fails to compile: no branch falls through."""
    if ACT == "silu":
        s = tl.sigmoid(x)
        return x / (1.0 + tl.exp(-x)), s * (1.0 + x * (1.0 - s))
    elif ACT == "gelu":  # erf form: Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return 0.5 * x * (1.0 + tl.erf(x / 1.4142135623730951)), cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == "gelu_tanh":  # 0.5 x (1 + tanh(y)) == x / (1 + exp(-2y)), without the cancellation
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * y)
        return x / (1.0 + tl.exp(-2.0 * y)), s + 2.0 * x * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == "relu2":
        r = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, like torch
        return r * r, 2.0 * r
    elif ACT == "identity":
        return x, tl.full(x.shape, 1.0, tl.float32)
    else:
        tl.static_assert(False, "unknown activation kernel name (add its branch to _elementwise)")


@triton.jit
def _act(x, ACT: tl.constexpr):
    """f(x) in fp32."""
    f, _ = _elementwise(x, ACT)
    return f


@triton.jit
def _act_tile(ptrs, mask, half, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
              SWIGLU_OAI: tl.constexpr, CLAMP: tl.constexpr):
    """Activation of a tile of outputs (any rank). ``ptrs`` point at each output's gate element (for
    INTERLEAVED: at its (gate, up) pair); the up element is ``half`` further (halves layout). -> fp32."""
    if not GATED:
        return _act(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), ACT)
    if INTERLEAVED:
        pair = tl.expand_dims(ptrs, -1) + tl.arange(0, 2)
        g, u = tl.split(tl.load(pair, mask=tl.expand_dims(mask, -1), other=0.0).to(tl.float32))
    else:
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    return _gated(g, u, alpha, limit, ACT, SWIGLU_OAI, CLAMP)


@triton.jit
def _gated(g, u, alpha, limit, ACT: tl.constexpr, SWIGLU_OAI: tl.constexpr, CLAMP: tl.constexpr):
    """A gated activation of fp32 gate / up values (the one formula: ``_act_tile`` and GEMM1's fused
    epilogue both call it; ``_gated_backward`` is its derivative)."""
    if CLAMP:  # NaN-propagating, like torch.clamp (the default min/max would turn NaN into ±limit)
        lim = tl.cast(limit, tl.float32)
        g = tl.minimum(g, lim, propagate_nan=tl.PropagateNan.ALL)
        u = tl.clamp(u, -lim, lim, propagate_nan=tl.PropagateNan.ALL)
    if SWIGLU_OAI:  # (u + 1) * g * sigmoid(alpha * g)
        y = (u + 1.0) * g * tl.sigmoid(tl.cast(alpha, tl.float32) * g)
    else:
        y = _act(g, ACT) * u
    return y


@triton.jit
def _gated_backward(g, u, dy, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr, SWIGLU_OAI: tl.constexpr,
                    CLAMP: tl.constexpr):
    """fp32 (dL/dgate, dL/dup) from the activation's gate/up inputs and dL/dy (non-gated: g is the input,
    -> (dL/dx, unused)). The clamp passes the gradient where g <= L and -L <= u <= L (torch.clamp's)."""
    if not GATED:
        _, d = _elementwise(g, ACT)
        return dy * d, dy
    if CLAMP:
        g_pass = g <= limit
        u_pass = (u >= -limit) & (u <= limit)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    if SWIGLU_OAI:  # (u + 1) g sigmoid(alpha g)
        s = tl.sigmoid(alpha * g)
        dg = dy * (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s))
        du = dy * g * s
    else:
        f, d = _elementwise(g, ACT)
        dg = dy * u * d
        du = dy * f
    if CLAMP:
        dg = tl.where(g_pass, dg, 0.0)
        du = tl.where(u_pass, du, 0.0)
    return dg, du


@triton.jit(do_not_specialize=["M"])
def _act_and_mul_kernel(
    x_ptr, out_ptr, M, n_out, half, stride_xm, stride_om, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SWIGLU_OAI: tl.constexpr,
    CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """x: [M, n_out * (2 if GATED else 1)] -> out: [M, n_out] in out's dtype; grid (M-blocks, n-blocks)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < n_out)[None, :]
    step = 2 if INTERLEAVED else 1
    ptrs = x_ptr + rows[:, None] * stride_xm + step * cols[None, :]
    y = _act_tile(ptrs, mask, half, alpha, limit, ACT, GATED, INTERLEAVED, SWIGLU_OAI, CLAMP)
    if EMULATE_BF16:
        y = _bf16_round(y)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, n_out, half, stride_xm, stride_qm, stride_sm, alpha, limit,
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SWIGLU_OAI: tl.constexpr,
    CLAMP: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, NG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    """x: [M, ...] -> q fp8: [M, n_out], s fp32: [M, 1] (GROUP == 0, per token) or [M, cdiv(n_out, GROUP)].

    Per token: a program owns BLOCK_M whole rows (ONE_PASS when a row fits in BLOCK_N, else the row is
    read twice: amax, then quantize). Per group: a program owns a [BLOCK_M, NG, GROUP_P2] tile = NG groups
    (GROUP_P2 = next_pow2(GROUP): lanes past GROUP are masked, so any group size works)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    step = 2 if INTERLEAVED else 1
    x_row = x_ptr + rows * stride_xm
    q_row = q_ptr + rows * stride_qm
    if GROUP > 0:
        grp = tl.program_id(1) * NG + tl.arange(0, NG)
        lane = tl.arange(0, GROUP_P2)
        cols = grp[:, None] * GROUP + lane[None, :]  # [NG, GROUP_P2]
        mask = mask_m[:, None, None] & ((cols < n_out) & (lane < GROUP)[None, :])[None, :, :]
        y = _act_tile(x_row[:, None, None] + step * cols[None, :, :], mask, half, alpha, limit,
                      ACT, GATED, INTERLEAVED, SWIGLU_OAI, CLAMP)
        y = tl.where(mask, y, 0.0)
        scale, inv = _scale_of(_from_bits(tl.max(_abs_bits(y), axis=2)), QMAX, EPS)  # [BLOCK_M, NG]
        q = _quantize(y, inv[:, :, None], QMAX, False, EMULATE_FP8, False)
        tl.store(q_row[:, None, None] + cols[None, :, :], q, mask=mask)
        tl.store(s_ptr + rows[:, None] * stride_sm + grp[None, :], scale,
                 mask=mask_m[:, None] & (grp * GROUP < n_out)[None, :])
    elif ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (cols < n_out)[None, :]
        y = _act_tile(x_row[:, None] + step * cols[None, :], mask, half, alpha, limit,
                      ACT, GATED, INTERLEAVED, SWIGLU_OAI, CLAMP)
        y = tl.where(mask, y, 0.0)
        scale, inv = _scale_of(_from_bits(tl.max(_abs_bits(y), axis=1)), QMAX, EPS)
        tl.store(q_row[:, None] + cols[None, :], _quantize(y, inv[:, None], QMAX, False, EMULATE_FP8, False),
                 mask=mask)
        tl.store(s_ptr + rows * stride_sm, scale, mask=mask_m)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.int32)  # bits of |y|: the integer max keeps NaN
        for n0 in range(0, n_out, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < n_out)[None, :]
            y = _act_tile(x_row[:, None] + step * cols[None, :], mask, half, alpha, limit,
                          ACT, GATED, INTERLEAVED, SWIGLU_OAI, CLAMP)
            amax = tl.maximum(amax, tl.max(_abs_bits(tl.where(mask, y, 0.0)), axis=1))
        scale, inv = _scale_of(_from_bits(amax), QMAX, EPS)
        for n0 in range(0, n_out, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = mask_m[:, None] & (cols < n_out)[None, :]
            y = _act_tile(x_row[:, None] + step * cols[None, :], mask, half, alpha, limit,
                          ACT, GATED, INTERLEAVED, SWIGLU_OAI, CLAMP)
            tl.store(q_row[:, None] + cols[None, :], _quantize(y, inv[:, None], QMAX, False, EMULATE_FP8, False),
                     mask=mask)
        tl.store(s_ptr + rows * stride_sm, scale, mask=mask_m)


def _act_meta(act: Activation, limit: float) -> dict:
    """The kernels' activation constexprs."""
    return dict(ACT=act.kernel, GATED=act.gated, INTERLEAVED=act.interleaved, SWIGLU_OAI=act.swiglu_oai,
                CLAMP=act.clamps(limit))


def _col_block(n: int, cap: int = 1024) -> int:
    """Largest pow2 column block <= cap whose padding wastes at most 1/8 of n (768 -> 256, 4096 -> 1024)."""
    bn = min(triton.next_power_of_2(max(n, 1)), cap)
    while bn > 128 and cdiv(n, bn) * bn * 8 > n * 9:
        bn //= 2
    return bn


def act_and_mul(x: torch.Tensor, act: Activation, alpha: float, limit: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, N] (``stride(-1) == 1``, rows may be strided) -> [M, N/2] for gated activations, [M, N]
    otherwise, in x's dtype (or ``out``'s: [M, n_out], ``stride(-1) == 1``); fp32 math. ``alpha`` /
    ``limit``: resolved floats (``act.alpha(...)``, ``act.limit(...)``)."""
    M, N = x.shape
    assert x.stride(-1) == 1, "x must have a contiguous last dim"
    n_out = N // 2 if act.gated else N
    if out is None:
        out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return out
    bn = _col_block(n_out)
    bm = max(1, min(64, 4096 // bn))
    launch(_act_and_mul_kernel, (cdiv(M, bm), cdiv(n_out, bn)),
        x, out, M, n_out, n_out, x.stride(0), out.stride(0), float(alpha), float(limit), **_act_meta(act, limit),
        BLOCK_M=bm, BLOCK_N=bn, EMULATE_BF16=out.dtype == torch.bfloat16 and interpret_mode(), num_warps=4,
    )
    return out


def quant_buffers(M: int, n: int, aq: ActivationQuant, group: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of quantizing an [M, n] activation: (q [M, n] fp8 e4m3fn, scale fp32 [M, aq.scale_cols(n,
    group)]); ``group`` > 0 when ``aq`` is grouped (any size: the kernels mask a power-of-two tile)."""
    if aq.grouped:
        assert group > 0, "a grouped activation quantization needs its group size"
    return (torch.empty((M, n), dtype=FP8_DTYPE, device=device),
            torch.empty((M, aq.scale_cols(n, group)), dtype=torch.float32, device=device))


def act_and_quant(x: torch.Tensor, act: Activation, alpha: float, limit: float, aq: ActivationQuant,
                  group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, N] -> (q [M, n_out] fp8 e4m3fn, scale fp32 [M, aq.scale_cols(n_out, group)]: [M, 1] per
    token, [M, cdiv(n_out, group)] grouped); equals ``aq.quantize(act.reference(x))`` in one pass (no fp32
    round trip through memory)."""
    M, N = x.shape
    assert x.stride(-1) == 1, "x must have a contiguous last dim"
    n_out = N // 2 if act.gated else N
    q, scale = quant_buffers(M, n_out, aq, group, x.device)
    meta = dict(**_act_meta(act, limit), QMAX=FP8_MAX, EPS=SCALE_EPS, EMULATE_FP8=interpret_mode())
    if aq.grouped:
        g = int(group)
        g_p2 = triton.next_power_of_2(g)
        groups = scale.shape[1]
        ng = max(1, min(triton.next_power_of_2(groups), 1024 // g_p2))
        bm = max(1, min(16, 2048 // (ng * g_p2)))
        grid = (cdiv(M, bm), cdiv(groups, ng))
        meta.update(GROUP=g, GROUP_P2=g_p2, NG=ng, BLOCK_M=bm, BLOCK_N=ng * g_p2, ONE_PASS=True, num_warps=4)
    else:
        n_p2 = triton.next_power_of_2(max(n_out, 1))
        one_pass = n_p2 <= _ONE_PASS_MAX
        bn = n_p2 if one_pass else min(4096, _ONE_PASS_MAX)
        bm = max(1, min(16, 2048 // bn))
        grid = (cdiv(M, bm), 1)
        meta.update(GROUP=0, GROUP_P2=1, NG=1, BLOCK_M=bm, BLOCK_N=bn, ONE_PASS=one_pass,
                    num_warps=8 if bn >= 4096 else 4)
    if M == 0 or n_out == 0:
        return q, scale
    launch(_act_quant_kernel, grid, x, q, scale, M, n_out, n_out, x.stride(0), q.stride(0), scale.stride(0),
                            float(alpha), float(limit), **meta)
    return q, scale


def quantize_activation(x: torch.Tensor, aq: ActivationQuant, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] any float, ``stride(-1) == 1`` -> (q [T, K] fp8 e4m3fn, scale fp32 [T, aq.scale_cols(K,
    group)]); one pass, T not specialized: the activation + quantize kernel with the identity."""
    return act_and_quant(x, IDENTITY, 0.0, 0.0, aq, group)
