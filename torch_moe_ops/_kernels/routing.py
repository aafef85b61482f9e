"""The routing kernel (docs/design.md §4): each program routes ``BLOCK_T`` tokens (``topk.route_rows``: sanitize,
score, correction bias, grouped top-k, renormalize, scale) and, as asked, also writes the GEMMs' alignment (one
program for every token) and GEMM1's fp8 input, so those launches go (docs/host-overhead.md, "Fewer launches").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import FP8_MAX, SCALE_EPS
from ._numerics import _abs_bits, _from_bits, _quantize, _scale_of
from .align import _align_program, _histograms, align_block_size, align_meta
from .configs import token_bucket
from .plan import launch
from .topk import expert_tile, route_constexprs, route_rows


@triton.jit(do_not_specialize=["T"])
def _topk_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, map_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, scratch_ptr,
    x_ptr, xq_ptr, xs_ptr,
    T, stride_t, stride_e, rsf, H, stride_xt, stride_qt, stride_st,
    E: tl.constexpr, GROUP_SIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, K_P2: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr,
    BM: tl.constexpr, HAS_MAP: tl.constexpr,
    QUANT_X: tl.constexpr, XGROUP: tl.constexpr, XBLOCK: tl.constexpr, XGROUPS: tl.constexpr, XROWS: tl.constexpr,
    QMAX: tl.constexpr, EPS: tl.constexpr,
    EMULATE_FP8: tl.constexpr, ALIGN: tl.constexpr, EB: tl.constexpr, B_P2: tl.constexpr, NB: tl.constexpr,
    TILE: tl.constexpr, COUNT_TILE: tl.constexpr, LOG_EB: tl.constexpr,
):
    """logits: [T, E] any float (strided) -> weights: [T, TOP_K] fp32, ids: [T, TOP_K] int32.

    ALIGN (one program, T <= BLOCK_T): also the GEMMs' alignment for block size BM, the layout and bits of
    ``align_block_size`` (``align._align_program`` on every pair as one chunk; scratch [1, 3, EB] int32).
    QUANT_X: also GEMM1's fp8 input, ``quantize_activation``'s bits: x [T, H] -> xq [T, H]
    fp8 e4m3fn, xs [T, cdiv(H, XGROUP)] fp32 (XGROUPS groups a step, each in XBLOCK = next_pow2(XGROUP) lanes) or
    [T, 1] (XGROUP = 0: per token, the row read twice in XBLOCK chunks: amax, then quantize). Grid (cdiv(T,
    BLOCK_T), 1 + cdiv(BLOCK_T, XROWS)): program (p, 0) routes (and aligns) block p's tokens, programs (p, s > 0)
    each quantize XROWS of them, in parallel with the routing (one program walking 16 rows of x ran 14 µs at
    T = 16 on an H100: a chain of dependent steps)."""
    pid = tl.program_id(0)
    sub = tl.program_id(1)
    if sub == 0:
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        mask_t = offs_t < T
        w_acc, id_acc = route_rows(logits_ptr, bias_ptr, offs_t, mask_t, stride_t, stride_e, rsf, GROUP_SIZE,
                                   NUM_GROUPS, TOPK_GROUP, TOP_K, K_P2, GP, GS, BLOCK_T, SIGMOID, HAS_BIAS, GROUPED,
                                   RENORMALIZE)
        offs_k = tl.arange(0, K_P2)
        out = offs_t[:, None] * TOP_K + offs_k[None, :]
        mask_out = mask_t[:, None] & (offs_k[None, :] < TOP_K)
        tl.store(weights_ptr + out, w_acc, mask=mask_out)
        tl.store(ids_ptr + out, id_acc, mask=mask_out)
        if ALIGN:
            tl.debug_barrier()  # the ids stored above are read back by other threads of this program
            numel = T * TOP_K
            totals, prior = _histograms(ids_ptr, map_ptr, 0, numel, 0, numel, E, EB, COUNT_TILE, HAS_MAP)
            max_padded = numel + E * (BM - 1)
            max_blocks = tl.cdiv(max_padded, BM)
            _align_program(ids_ptr, map_ptr, scratch_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, totals, prior, pid,
                           0, numel, tl.cdiv(numel, TILE) * TILE, max_blocks, max_blocks, max_padded, E, EB, BM,
                           B_P2, NB, TILE, LOG_EB, HAS_MAP)
    elif QUANT_X:  # the stores stay in this body: torch.compile's mutation analysis reads them here (no name is
        # assigned in both branches: a value the if yields makes that analysis take every pointer as written)
        offs_q = (pid.to(tl.int64) * BLOCK_T + (sub - 1) * XROWS + tl.arange(0, XROWS).to(tl.int64))  # [XROWS]
        mask_q = (offs_q < T) & ((sub - 1) * XROWS + tl.arange(0, XROWS) < BLOCK_T)
        x_row = x_ptr + offs_q * stride_xt
        q_row = xq_ptr + offs_q * stride_qt
        lane = tl.arange(0, XBLOCK)
        if XGROUP > 0:  # XGROUPS groups a step (one step covers H at T = 1): a scale each
            offs_g = tl.arange(0, XGROUPS)
            for h0 in range(0, H, XGROUP * XGROUPS):
                g = h0 // XGROUP + offs_g  # [NG] group indices
                cols = g[:, None] * XGROUP + lane[None, :]  # [NG, XB]
                m = mask_q[:, None, None] & ((lane[None, :] < XGROUP) & (cols < H))[None, :, :]
                y = tl.load(x_row[:, None, None] + cols[None, :, :], mask=m, other=0.0).to(tl.float32)
                # y: [XROWS, NG, XB]
                scale, inv = _scale_of(_from_bits(tl.max(_abs_bits(y), axis=2)), QMAX, EPS)  # [XROWS, NG]
                tl.store(xs_ptr + offs_q[:, None] * stride_st + g[None, :], scale,
                         mask=mask_q[:, None] & (g * XGROUP < H)[None, :])
                tl.store(q_row[:, None, None] + cols[None, :, :],
                         _quantize(y, inv[:, :, None], QMAX, False, EMULATE_FP8, False), mask=m)
        else:  # per token: the row's amax in XBLOCK chunks, then the row again
            amax = tl.zeros([XROWS], dtype=tl.int32)  # bits of |x|: the integer max keeps NaN
            for h0 in range(0, H, XBLOCK):
                cols = h0 + lane
                m = mask_q[:, None] & (cols < H)[None, :]
                y = tl.load(x_row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(_abs_bits(y), axis=1))
            scale, inv = _scale_of(_from_bits(amax), QMAX, EPS)
            tl.store(xs_ptr + offs_q * stride_st, scale, mask=mask_q)
            for h0 in range(0, H, XBLOCK):
                cols = h0 + lane
                m = mask_q[:, None] & (cols < H)[None, :]
                y = tl.load(x_row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
                tl.store(q_row[:, None] + cols[None, :], _quantize(y, inv[:, None], QMAX, False, EMULATE_FP8, False),
                         mask=m)


def topk_route(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: int = 0,
    topk_group: int = 0,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    quant_x: tuple | None = None,
    align: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] bf16/fp16/fp32 (any strides) -> (topk_weights [T, k] fp32, topk_ids [T, k] int32).

    Arguments are assumed validated (E <= 65535, k <= E, E % G == 0, E > G, topk_group <= G);
    ``e_score_correction_bias``: [E] fp32 or None. One launch, grid ``cdiv(T, BLOCK_T)`` (× 1 + the quantizing
    programs with ``quant_x``); T is not specialized.
    ``align``: ((sorted_ids, expert_ids, num_post_pad) from ``align.align_buffers`` for T·k pairs and the logits'
    E, block_m, expert_map or None), where ``one_program(T, E, num_expert_group)``: the kernel also writes
    ``align_block_size``'s alignment into them (its launch goes). ``quant_x``: (x [T, H], q, scale, group) with q
    and scale from ``activation.quant_buffers`` (group 0: per token): the kernel also writes
    ``quantize_activation(x)`` into them, bitwise (GEMM1's fp8 input without a launch of its own)."""
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty((T, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    if T == 0:
        return weights, ids
    block_t = tokens_per_program(E, num_expert_group)
    warps = 4
    if isinstance(T, int) and T == 1 and align is None:  # one token: one row, one warp unless it quantizes x
        block_t, warps = 1, (4 if quant_x is not None else 1)
    bias = e_score_correction_bias
    # every constexpr passed (no defaults): torch.compile's analysis of the kernel needs them all
    sorted_ids = expert_ids = npp = expert_map = None
    block_m = 1
    if align is not None:
        assert T <= block_t, "align: one program must route every token (one_program)"
        (sorted_ids, expert_ids, npp), block_m, expert_map = align
    meta = align_meta(E, block_m, expert_map is not None)
    align_kw = dict(ALIGN=align is not None,
                    **{k: meta[k] for k in ("EB", "B_P2", "NB", "TILE", "COUNT_TILE", "LOG_EB")})
    scratch = torch.empty((1, 3, meta["EB"]), dtype=torch.int32, device=dev) if align is not None else None
    x = xq = xs = None
    xq_kw = dict(QUANT_X=False, XGROUP=0, XBLOCK=16, XGROUPS=1, XROWS=1, QMAX=FP8_MAX, EPS=SCALE_EPS,
                 EMULATE_FP8=False)
    quant_programs = 0
    if quant_x is not None:
        x, xq, xs, group = quant_x
        # XROWS rows a quantizing program, <= 4096 values a step: per token, chunks of the row; else whole groups,
        # each in a power-of-two lane block (one group a step ran 12-16 us at T = 1 on an H100: latency-bound)
        H = x.shape[1]
        rows = max(1, min(block_t, 4096 // triton.next_power_of_2(H)))
        chunk = triton.next_power_of_2(group) if group else max(16, min(triton.next_power_of_2(H), 4096 // rows))
        groups = max(1, min(triton.next_power_of_2(triton.cdiv(H, group)), 4096 // (rows * chunk))) if group else 1
        xq_kw.update(QUANT_X=True, XGROUP=group, XBLOCK=chunk, XGROUPS=groups, XROWS=rows,
                     EMULATE_FP8=interpret_mode())
        quant_programs = triton.cdiv(block_t, rows)
    grid = (triton.cdiv(T, block_t), 1 + quant_programs)
    launch(_topk_route_kernel, grid,  # absent tensors are None: constexprs (gemm.invoke_moe_gemm)
        router_logits, bias, weights, ids, expert_map, sorted_ids, expert_ids, npp, scratch, x, xq, xs,
        T, router_logits.stride(0), router_logits.stride(1), float(routed_scaling_factor),
        *((x.shape[1], x.stride(0), xq.stride(0), xs.stride(0)) if x is not None else (0, 0, 0, 0)),
        E=E, BLOCK_T=block_t, BM=block_m, HAS_MAP=expert_map is not None,
        **route_constexprs(E, top_k, renormalize, scoring_func, num_expert_group, topk_group, bias is not None),
        **xq_kw, **align_kw, num_warps=warps,
    )
    return weights, ids


def tokens_per_program(E: int, num_expert_group: int) -> int:
    """The routing kernel's BLOCK_T for T > 1: as many tokens as fit 2048 expert slots, at most 32. The weights'
    bits do not depend on it (``topk``: fixed-order sums), only the work a program does."""
    gp, gs = expert_tile(E, num_expert_group)[3:]
    return max(1, min(32, 2048 // (gp * gs)))


def one_program(T, E: int, num_expert_group: int) -> bool:
    """Whether one routing program routes every token of any T in T's token bucket (``configs.token_bucket``),
    so that it can also align them (``topk_route(..., align=...)``); a symbolic T is guarded to its bucket only."""
    return token_bucket(T) <= tokens_per_program(E, num_expert_group)


def pair_blocks_of(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None) -> tuple:
    """The layout of one pair a block (pair j alone at slot 0 of block j) for given ids [T, k], built with torch
    ops. Used by batch-invariant mode in the Triton interpreter, whose dot (NumPy) rounds a row by its position
    in the tile (docs/batch-invariance.md); every pair then sits at row 0. ``num_experts``: the ids' range
    (``expert_map.numel()`` when a map translates them); dropped pairs get expert -1."""
    numel = topk_ids.numel()
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    local = torch.where(valid, ids, torch.zeros_like(ids))
    if expert_map is not None:
        local = expert_map.long()[local]
        valid &= local >= 0
    sorted_ids = torch.full((numel * block_m,), numel, dtype=torch.int32, device=dev)
    sorted_ids[::block_m] = torch.arange(numel, dtype=torch.int32, device=dev)
    expert_ids = torch.where(valid, local, torch.full_like(local, -1)).to(torch.int32)
    return sorted_ids, expert_ids, torch.full((1,), numel * block_m, dtype=torch.int32, device=dev)


def rows_apart(invariant: bool) -> bool:
    """Whether the GEMMs need every pair at row 0 of its own block: batch-invariant calls in the Triton interpreter,
    whose dot (NumPy) rounds a row by its place in the tile (docs/batch-invariance.md)."""
    return invariant and interpret_mode()


def invariant_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None,
                        invariant: bool) -> tuple:
    """The GEMMs' alignment for ``block_m``: ``align_block_size``'s, or ``pair_blocks_of`` where ``rows_apart``."""
    if rows_apart(invariant):
        return pair_blocks_of(topk_ids, num_experts, block_m, expert_map)
    return align_block_size(topk_ids, num_experts, block_m, expert_map)
