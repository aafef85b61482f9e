"""Backward of the fused experts on Triton (docs/training.md): grouped dgrad / wgrad GEMMs on the forward's
alignment, the activation backward fused into GEMM2's dgrad epilogue. Same math as
``reference.backward.fused_experts_backward``; arguments arrive checked and canonical from the ops layer.

- ``_moe_dgrad_kernel``: ``out[j] = epilogue(a[j // A_DIV] @ deq(W[e(j)]))`` for W stored ``[E, R, C]``
  (C contiguous; int4 two per byte along C): the forward's weights read untransposed, one expert per
  BLOCK_M block of ``sorted_ids``. Quantized weights are dequantized in the K loop (scales along R or per
  tile / group, gathered per element), so no dequantized copy exists. Epilogue: a row dot with a second
  operand (the router-weight gradient, as per-column-tile partial sums: no atomics), the router weight,
  then a plain store or the activation backward (reads c1's gate/up, writes dc1).
- ``_moe_wgrad_kernel``: ``dW[e] = Σ_j dy_jᵀ a_j`` over expert e's blocks (block bounds from
  ``expert_ids``, on the device), with the bias gradient ``Σ_j dy_j`` fused; experts without pairs get 0.

No host sync, allocations static in T (docs/design.md §8), deterministic (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import Activation, QuantScheme, cdiv
from ._numerics import _bf16_round
from .activation import _gated_backward
from .formats import (block_pairs, decode_pairs, decode_scale, scale_values, stored_value_scales, swizzle,
                      tensor_scale_half)
from .fused_experts import gemm1, gemm1_input, gemm2_input
from .gemm import gemm_grid_rows
from .moe_sum import moe_sum


@triton.jit
def _dot(acc, a, w, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """acc + a @ w, w in a's dtype (the interpreter: both in fp32, its bf16 dot multiplies raw bit patterns)."""
    if UPCAST:
        a, w = a.to(tl.float32), w.to(tl.float32)
    else:
        w = w.to(a.dtype)
    if FP32_IEEE:
        return tl.dot(a, w, acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit(do_not_specialize=["num_pid_m", "num_valid"])
def _moe_dgrad_kernel(
    a_ptr, w_ptr, out_ptr, w_scale_ptr, rw_ptr, c1_ptr, d_ptr, part_ptr, bias_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    R, C, C_STORED, num_pid_m, num_valid, alpha, limit,
    stride_am, stride_we, stride_wr, stride_wc, stride_om, stride_c1m, stride_dm, stride_pm,
    stride_se, stride_sr, stride_sc, stride_be,
    GROUP_R: tl.constexpr, GROUP_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_DIV: tl.constexpr, D_DIV: tl.constexpr, ROW_WEIGHT: tl.constexpr, EPILOGUE: tl.constexpr,
    NEED_DOT: tl.constexpr, BIAS_DOT: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
    SWIGLU_OAI: tl.constexpr, CLAMP: tl.constexpr, TENSOR_SCALE_COLS: tl.constexpr,
    W_TENSOR_SCALE: tl.constexpr, W_CHANNEL_SCALE: tl.constexpr, TILE_SCALES: tl.constexpr,
    W_PACKED: tl.constexpr, W_CODEC: tl.constexpr, DEQUANT: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """EPILOGUE 0: store ``out [T·k, C]``; 1: activation backward into ``out = dc1 [T·k, N1]`` (C = I);
    2: no store. NEED_DOT: ``part[j, pid_n] = Σ_n acc[j, n]·d[j // D_DIV, n]`` (before the router weight),
    plus ``Σ_r a[j, r]·bias[e, r]`` in the ``pid_n == 0`` column (BIAS_DOT: the w2 bias term of dL/dw_j)."""
    pid_m, pid_n = swizzle(C, num_pid_m, BLOCK_N, GROUP_M)  # the forward GEMM's prologue
    num_post_pad = tl.load(num_post_pad_ptr)
    if pid_m * BLOCK_M >= num_post_pad:
        return
    offs_token, mask_token, expert = block_pairs(sorted_ids_ptr, expert_ids_ptr, pid_m, num_post_pad, num_valid,
                                                 BLOCK_M)  # [BM], [BM], scalar
    # A -1 block (non-local pairs) runs no K step: its rows get zero gradients.
    num_k = tl.where(expert >= 0, tl.cdiv(R, BLOCK_K), 0)
    expert = tl.maximum(expert, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    offs_wn = offs_n % C  # wrapped, like the forward: unpredicated weight columns, masked stores
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_token // A_DIV)[:, None] * stride_am + offs_k[None, :]
    w_base = w_ptr + expert * stride_we
    if W_PACKED:  # byte j holds columns 2j (low half) and 2j + 1: each byte loaded once, decoded as a pair
        # [BN/2] wrapped; C_STORED = C / 2 is an argument (not computed here) so that its divisibility by 16
        # reaches the compiler: 16-byte weight loads, not 8-byte ones
        offs_wj = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)) % C_STORED
        w_cols = offs_wj.to(tl.int64) * stride_wc
        s_cols = ((2 * offs_wj) // GROUP_C) * stride_sc  # the pair's [1, G] group (G is even)
    else:
        w_cols = offs_wn.to(tl.int64) * stride_wc
        s_cols = (offs_wn // GROUP_C) * stride_sc
    if DEQUANT:  # quantized weights, packed ones included (unquantized: no scales, w_scale_ptr is None)
        s_base = w_scale_ptr + expert * stride_se
    if UPCAST or FP32_IEEE:  # the dot's dtype: fp32 in the interpreter (its bf16 dot is wrong) and for fp32
        DOT_DT: tl.constexpr = tl.float32
    else:
        DOT_DT: tl.constexpr = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_PACKED:  # even and odd output columns accumulate apart (a packed operand fed to one dot through
        # join + reshape breaks Triton 3.6's sm90 dot-operand pass: "Illegal shared layout")
        acc_lo = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kk in range(0, num_k):
        offs_r = kk * BLOCK_K + offs_k
        mask_r = offs_r < R
        a = tl.load(a_ptrs, mask=mask_token[:, None] & mask_r[None, :], other=0.0)
        if BIAS_DOT:
            bias = tl.load(bias_ptr + expert * stride_be + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            bias_acc += tl.sum(a.to(tl.float32) * bias[None, :], axis=1)
        w = tl.load(w_base + offs_r[:, None].to(tl.int64) * stride_wr + w_cols[None, :], mask=mask_r[:, None],
                    other=0.0)
        if W_PACKED:  # [BK, BN/2] bytes -> even / odd columns' values in the dot's dtype, scaled per group
            lo, hi = decode_pairs(w, W_CODEC, DOT_DT)
            s_ptrs = s_base + (offs_r // GROUP_R)[:, None] * stride_sr + s_cols[None, :]
            s = stored_value_scales(tl.load(s_ptrs, mask=mask_r[:, None], other=0), W_CODEC, DOT_DT)
            acc_lo = _dot(acc_lo, a, scale_values(lo, s), UPCAST, FP32_IEEE)
            acc_hi = _dot(acc_hi, a, scale_values(hi, s), UPCAST, FP32_IEEE)
        else:
            if DEQUANT:  # frozen quantized weights, dequantized in registers (fp32) per element
                w = w.to(tl.float32)
                if W_TENSOR_SCALE and TENSOR_SCALE_COLS == 2:  # gate / up halves of w13 along R
                    w = w * tl.load(s_base + tensor_scale_half(offs_r, R, INTERLEAVED) * stride_sr)[:, None]
                elif W_TENSOR_SCALE:
                    w = w * tl.load(s_base)
                elif W_CHANNEL_SCALE:  # one scale per forward output row = per R here
                    w = w * tl.load(s_base + offs_r * stride_sr, mask=mask_r, other=0.0)[:, None]
                elif TILE_SCALES:  # [GROUP_R, GROUP_C] tiles (fp8_block)
                    s_ptrs = s_base + (offs_r // GROUP_R)[:, None] * stride_sr + s_cols[None, :]
                    w = w * decode_scale(tl.load(s_ptrs, mask=mask_r[:, None], other=0), W_CODEC)
            acc = _dot(acc, a, w, UPCAST, FP32_IEEE)
        a_ptrs += BLOCK_K

    if W_PACKED:  # columns 2j, 2j + 1 side by side again
        acc = tl.reshape(tl.join(acc_lo, acc_hi), (BLOCK_M, BLOCK_N))
    mask_o = mask_token[:, None] & mask_n[None, :]
    if NEED_DOT:  # router-weight gradient, one partial sum per column tile (summed by the launcher)
        d = tl.load(d_ptr + (offs_token // D_DIV)[:, None] * stride_dm + offs_n[None, :], mask=mask_o, other=0.0)
        part = tl.sum(acc * d.to(tl.float32), axis=1)
        if BIAS_DOT:
            part += tl.where(pid_n == 0, bias_acc, 0.0)
        tl.store(part_ptr + offs_token * stride_pm + pid_n, part, mask=mask_token)
    if ROW_WEIGHT:
        acc = acc * tl.load(rw_ptr + offs_token, mask=mask_token, other=0.0).to(tl.float32)[:, None]
    if EPILOGUE == 0:
        if BF16_RTNE:  # interpreter only: its fp32 -> bf16 cast truncates
            acc = _bf16_round(acc)
        tl.store(out_ptr + offs_token[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_o)
    elif EPILOGUE == 1:
        if INTERLEAVED:
            g_col = 2 * offs_n
            u_col = g_col + 1
        else:
            g_col = offs_n
            u_col = offs_n + C
        rows_c1 = c1_ptr + offs_token[:, None] * stride_c1m
        g = tl.load(rows_c1 + g_col[None, :], mask=mask_o, other=0.0).to(tl.float32)
        if GATED:
            u = tl.load(rows_c1 + u_col[None, :], mask=mask_o, other=0.0).to(tl.float32)
        else:
            u = g
        dg, du = _gated_backward(g, u, acc, alpha, limit, ACT, GATED, SWIGLU_OAI, CLAMP)
        if BF16_RTNE:
            dg = _bf16_round(dg)
            du = _bf16_round(du)
        rows_out = out_ptr + offs_token[:, None] * stride_om
        tl.store(rows_out + g_col[None, :], dg.to(out_ptr.dtype.element_ty), mask=mask_o)
        if GATED:
            tl.store(rows_out + u_col[None, :], du.to(out_ptr.dtype.element_ty), mask=mask_o)


@triton.jit(do_not_specialize=["num_valid"])
def _moe_wgrad_kernel(
    dy_ptr, a_ptr, dw_ptr, db_ptr, rw_ptr, sorted_ids_ptr, bounds_ptr, R, C, num_valid,
    stride_dym, stride_am, stride_dwe, stride_dwr, stride_dwc, stride_dbe,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DY_DIV: tl.constexpr,
    A_DIV: tl.constexpr, DY_WEIGHT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    """``dw[e] [R, C] = Σ_j dy[j // DY_DIV]ᵀ (× rw[j]) a[j // A_DIV]`` over the blocks ``[bounds[e],
    bounds[e + 1])`` of sorted_ids (HAS_DW); ``db[e] = Σ_j dy_j`` (HAS_DB, in the first C tile; without
    HAS_DW the grid has one C tile). Grid (R-tiles × C-tiles, E)."""
    e = tl.program_id(1).to(tl.int64)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    pid_r = tl.program_id(0) // num_pid_c
    pid_c = tl.program_id(0) % num_pid_c
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    b0 = tl.load(bounds_ptr + e)
    b1 = tl.load(bounds_ptr + e + 1)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for b in range(b0, b1):
        offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)  # b is int64: bounds are int64
        j = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        valid = j < num_valid
        dyt = tl.load(dy_ptr + (j // DY_DIV)[None, :] * stride_dym + offs_r[:, None],
                      mask=mask_r[:, None] & valid[None, :], other=0.0)
        if DY_WEIGHT:  # dy_j = g_t · w_j (fp32, then the operand dtype)
            dyt = dyt.to(tl.float32) * tl.load(rw_ptr + j, mask=valid, other=0.0).to(tl.float32)[None, :]
        if HAS_DB:
            db += tl.sum(dyt.to(tl.float32), axis=1)
        if HAS_DW:
            at = tl.load(a_ptr + (j // A_DIV)[:, None] * stride_am + offs_c[None, :],
                         mask=valid[:, None] & mask_c[None, :], other=0.0)
            if UPCAST:
                dyt = dyt.to(tl.float32)
                at = at.to(tl.float32)
            else:
                dyt = dyt.to(at.dtype)
            if FP32_IEEE:
                acc = tl.dot(dyt, at, acc, input_precision="ieee")
            else:
                acc = tl.dot(dyt, at, acc)
    if HAS_DW:
        if BF16_RTNE:
            acc = _bf16_round(acc)
        tl.store(dw_ptr + e * stride_dwe + offs_r[:, None] * stride_dwr + offs_c[None, :] * stride_dwc,
                 acc.to(dw_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])
    if HAS_DB:
        if BF16_RTNE:
            db = _bf16_round(db)
        if pid_c == 0:  # one column tile owns the bias gradient
            tl.store(db_ptr + e * stride_dbe + offs_r, db.to(db_ptr.dtype.element_ty), mask=mask_r)


def _pow2_tile(n: int, cap: int) -> int:
    """Smallest power of two >= n (at least 16, at most cap): tiles never dwarf a tiny dim."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _dgrad_tiles(block_m: int, R: int, C: int, fp32: bool) -> dict:
    """Untuned tiles of the dgrad GEMM (BLOCK_M is the alignment block); the interpreter's are tiny."""
    if interpret_mode():
        return dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    bn, bk = _pow2_tile(C, 128), _pow2_tile(R, 32 if fp32 else 64)
    return dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if block_m * bn >= 8192 else 4,
                num_stages=2 if fp32 else 3)


def _wgrad_tiles(R: int, C: int, fp32: bool) -> dict:
    if interpret_mode():
        return dict(BLOCK_R=32, BLOCK_C=32, num_warps=4, num_stages=1)
    br, bc = _pow2_tile(R, 64 if fp32 else 128), _pow2_tile(C, 64 if fp32 else 128)
    return dict(BLOCK_R=br, BLOCK_C=bc, num_warps=8 if br * bc >= 16384 else 4, num_stages=2 if fp32 else 3)


def _emulation(dtype: torch.dtype, out_dtype: torch.dtype) -> dict:
    interp = interpret_mode()
    return dict(UPCAST=interp and dtype == torch.bfloat16, FP32_IEEE=dtype == torch.float32,
                BF16_RTNE=interp and out_dtype == torch.bfloat16)


def invoke_dgrad(a, a_div, w, out, align, block_m, numel, scheme: QuantScheme, *, w_scale=None, block=None,
                 act: Activation | None = None, alpha=0.0, limit=0.0, c1=None, rw=None, d=None, d_div=1,
                 bias=None, epilogue=0, interleaved=False):
    """``out[j] = epilogue(a[j // a_div] @ deq(W[e(j)]))`` for w [E, R, C / pack] and the ``numel = T·k``
    pairs of ``align`` (sorted_ids, expert_ids, num_post_pad with block size ``block_m``); returns the
    router-weight partials fp32 [T·k, C-tiles] when ``d`` is given (0 for dropped pairs), else None.

    a: [rows, R] compute dtype, contiguous. out: [T·k, C] (epilogue 0), dc1 [T·k, N1] (1) or None (2).
    c1: [T·k, N1] for epilogue 1. rw: [T·k] router weights multiplied into the output rows. d: [rows_d, C]
    (row j // d_div) dotted with the unweighted rows; bias [E, R] adds its dot with a (``BIAS_DOT``)."""
    sorted_ids, expert_ids, num_post_pad = align
    pack = scheme.weight.pack if scheme.quantized else 1
    E, R, C = w.shape[0], w.shape[1], w.shape[2] * pack
    tiles = _dgrad_tiles(block_m, R, C, a.dtype == torch.float32)
    num_pid_m = gemm_grid_rows(sorted_ids.numel(), numel, block_m)
    part = None
    if d is not None:
        part = torch.zeros((numel, cdiv(C, tiles["BLOCK_N"])), dtype=torch.float32, device=a.device)
    if num_pid_m == 0 or C == 0:
        return part
    assert a.stride(-1) == 1 and (d is None or d.stride(-1) == 1)
    flags = scheme.flags
    s_strides = (tuple(w_scale.stride()) + (0, 0))[:3] if w_scale is not None else (0, 0, 0)
    group_r, group_c = block if scheme.tiled else (1, 1)
    act_meta = dict(ACT="identity", GATED=False, SWIGLU_OAI=False, CLAMP=False)
    if act is not None:
        act_meta = dict(ACT=act.kernel, GATED=act.gated, SWIGLU_OAI=act.swiglu_oai, CLAMP=act.clamps(limit))
    grid = (num_pid_m * cdiv(C, tiles["BLOCK_N"]),)
    _moe_dgrad_kernel[grid](
        a, w, out, w_scale, rw, c1, d, part, bias,  # absent tensors are None: constexprs (gemm.invoke_moe_gemm)
        sorted_ids, expert_ids, num_post_pad, R, C, w.shape[2], num_pid_m, numel, float(alpha), float(limit),
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0) if out is not None else 0,
        c1.stride(0) if c1 is not None else 0, d.stride(0) if d is not None else 0,
        part.stride(0) if part is not None else 0, *s_strides, bias.stride(0) if bias is not None else 0,
        GROUP_R=group_r, GROUP_C=group_c, BLOCK_M=block_m, A_DIV=a_div, D_DIV=d_div, ROW_WEIGHT=rw is not None,
        EPILOGUE=epilogue, NEED_DOT=d is not None, BIAS_DOT=bias is not None, INTERLEAVED=interleaved, **act_meta,
        TENSOR_SCALE_COLS=w_scale.shape[1] if flags.W_TENSOR_SCALE and w_scale.dim() > 1 else 1,
        W_TENSOR_SCALE=flags.W_TENSOR_SCALE, W_CHANNEL_SCALE=flags.W_CHANNEL_SCALE, TILE_SCALES=scheme.tiled,
        W_PACKED=scheme.packed, W_CODEC=scheme.codec, DEQUANT=scheme.quantized,
        **_emulation(a.dtype, out.dtype if out is not None else a.dtype), **tiles,
    )
    return part


def expert_block_bounds(expert_ids: torch.Tensor, num_post_pad: torch.Tensor, block_m: int, E: int) -> torch.Tensor:
    """[E + 1] int64: expert e owns blocks ``[b[e], b[e + 1])`` of sorted_ids (docs/design.md §7 groups the
    blocks by ascending expert); on the device, static shapes, no sync."""
    blocks = torch.arange(expert_ids.numel(), device=expert_ids.device, dtype=torch.int32)
    live = (blocks * block_m < num_post_pad) & (expert_ids >= 0)
    eid = torch.where(live, expert_ids, E)
    return torch.searchsorted(eid, torch.arange(E + 1, device=eid.device, dtype=eid.dtype))


def invoke_wgrad(dy, dy_div, a, a_div, dw, db, sorted_ids, bounds, block_m, numel, *, rw=None):
    """Per expert e: ``dw[e] [R, C] = Σ_j (dy[j // dy_div] × rw[j])ᵀ a[j // a_div]`` and ``db[e] [R] = Σ_j
    dy_j × rw[j]`` over its pairs (either may be None; a is unused without dw)."""
    E, R = (dw if dw is not None else db).shape[:2]
    C = dw.shape[2] if dw is not None else 1
    if R == 0 or C == 0 or E == 0:
        return
    assert dy.stride(-1) == 1 and (dw is None or a.stride(-1) == 1)
    tiles = _wgrad_tiles(R, C, dy.dtype == torch.float32)
    grid = (cdiv(R, tiles["BLOCK_R"]) * (cdiv(C, tiles["BLOCK_C"]) if dw is not None else 1), E)
    out = dw if dw is not None else db
    _moe_wgrad_kernel[grid](
        dy, a if dw is not None else dy, out, db if db is not None else out, rw if rw is not None else dy,
        sorted_ids, bounds, R, C, numel, dy.stride(0), a.stride(0) if dw is not None else 0,
        *(dw.stride() if dw is not None else (0, 0, 0)), db.stride(0) if db is not None else 0,
        BLOCK_M=block_m, DY_DIV=dy_div, A_DIV=a_div, DY_WEIGHT=rw is not None, HAS_DW=dw is not None,
        HAS_DB=db is not None, **_emulation(dy.dtype, out.dtype), **tiles,
    )


def fused_experts_backward(grad_out, x, w13, w2, topk_weights, topk_ids, act: Activation, scheme: QuantScheme,
                           w13_scale, w2_scale, w13_bias, w2_bias, block, expert_map, on_input: bool, alpha: float,
                           limit: float, needs, c1=None):
    """Gradients of ``_kernels.fused_experts.fused_experts`` for grad_out [T, H] (x's dtype).

    needs: six bools (hidden_states, w13, w2, w13_bias, w2_bias, topk_weights). c1: the forward's GEMM1
    output [T·k, N1] in x's dtype, or None to recompute it (alignment + GEMM1, as in the forward). Returns
    six tensors or None: dx [T, H] x dtype, dW13 / dW2 in the weights' dtype, db13 / db2 in the biases'
    dtype, dtopk_weights fp32 [T, k]. Other arguments: as in the forward (canonical scales and floats)."""
    n_x, n_w13, n_w2, n_b13, n_b2, n_tw = (bool(n) for n in needs)
    aq, group = scheme.act, scheme.act_group(block)
    T, H = x.shape
    E, N1 = w13.shape[0], w13.shape[1]
    I = w2.shape[2] * (scheme.weight.pack if scheme.quantized else 1)
    k = topk_ids.shape[1]
    numel, dev = T * k, x.device
    new = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
    dx = new((T, H), x.dtype) if n_x else None
    dw13 = new((E, N1, H), w13.dtype) if n_w13 else None
    dw2 = new((E, H, I), w2.dtype) if n_w2 else None
    db13 = new((E, N1), w13_bias.dtype) if n_b13 else None
    db2 = new((E, H), w2_bias.dtype) if n_b2 else None
    dtw = None
    if numel == 0:
        zero = lambda t: t.zero_() if t is not None else None  # noqa: E731
        dtw = torch.zeros((T, k), dtype=torch.float32, device=dev) if n_tw else None
        return zero(dx), zero(dw13), zero(dw2), zero(db13), zero(db2), dtw

    # The forward's steps (fused_experts.py): alignment and GEMM1 input; GEMM1 is recomputed unless c1 was saved.
    cfg1, align, a1, a1_div = gemm1_input(x, w13, topk_weights, topk_ids, scheme, block, expert_map, on_input)
    if c1 is None:
        c1 = new((numel, N1), x.dtype)
        gemm1(a1, a1_div, w13, c1, align, cfg1, scheme, w13_scale, w13_bias, block, act)
    bm, rw = cfg1.block_m, topk_weights.reshape(-1)
    num_experts = E if expert_map is None else expert_map.numel()
    a2 = None
    if n_w2 or (n_tw and not on_input):  # GEMM2's input, as the forward computed it
        a2, a2_scale = gemm2_input(c1, act, alpha, limit, scheme, block)
        a2 = a2 if a2_scale is None else aq.dequantize(a2, a2_scale, group)
    g = grad_out.contiguous()
    through1 = n_x or n_w13 or n_b13 or (n_tw and on_input)
    tw_on_output = n_tw and not on_input
    dc1 = new((numel, N1), x.dtype) if through1 else None
    part = None
    if through1 or tw_on_output:  # dgrad of GEMM2 + activation backward: dc1 = f'(c1) · (g W2) · w
        part = invoke_dgrad(g, k, w2, dc1, align, bm, numel, scheme, w_scale=w2_scale, block=block, act=act,
                            alpha=alpha, limit=limit, c1=c1, rw=None if on_input else rw,
                            d=a2 if tw_on_output else None, bias=w2_bias if tw_on_output else None,
                            epilogue=1 if through1 else 2, interleaved=act.interleaved)
    if n_w2 or n_b2 or n_w13 or n_b13:
        bounds = expert_block_bounds(align[1], align[2], bm, E)
        if n_w2 or n_b2:  # dW2[e] = Σ_j (g_t w_j)ᵀ a2_j, db2[e] = Σ_j g_t w_j
            invoke_wgrad(g, k, a2, 1, dw2, db2, align[0], bounds, bm, numel, rw=None if on_input else rw)
        if n_w13 or n_b13:  # dW13[e] = Σ_j dc1_jᵀ a1_j, db13[e] = Σ_j dc1_j
            invoke_wgrad(dc1, 1, a1, a1_div, dw13, db13, align[0], bounds, bm, numel)
    if n_x or (n_tw and on_input):  # dgrad of GEMM1: da_j = dc1_j W13 (× w_j on input), summed per token
        da = (torch.zeros if k == 1 else torch.empty)((numel, H), dtype=x.dtype, device=dev) if n_x else None
        p1 = invoke_dgrad(dc1, 1, w13, da, align, bm, numel, scheme, w_scale=w13_scale, block=block,
                          rw=rw if on_input else None, d=x if n_tw and on_input else None, d_div=k,
                          epilogue=0 if n_x else 2, interleaved=act.interleaved)
        part = p1 if on_input else part
        if n_x:
            dx = da.view(T, H) if k == 1 else moe_sum(da.view(T, k, H), out=dx, topk_ids=topk_ids,
                                                      expert_map=expert_map, num_experts=num_experts)
    if n_tw:
        dtw = part.sum(1).view(T, k)
    return dx, dw13, dw2, db13, db2, dtw
