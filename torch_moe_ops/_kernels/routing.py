"""Fused router top-k (docs/design.md §4): sanitize, score, correction bias, grouped top-k, renormalize, scale.

One program handles ``BLOCK_T`` tokens. The expert axis is loaded as a 3-D tile ``[BLOCK_T, GP, GS]``
(``GP = next_pow2(num_expert_group)``, ``GS = next_pow2(E / num_expert_group)``; plain top-k uses
``GP = 1``), so group scores are plain reductions over the last axis and padded slots (experts past
the group size, groups past ``G``) are masked. Selection packs each candidate into one int64 key
``(order-preserving int32 of the fp32 score) << 32 | (65535 - expert)``, so a single ``max`` picks the
largest score and, among equal scores, the LOWEST expert id (the reference's stable sort).

A NaN selection score (a NaN correction bias, or +inf + -inf in a group's top-two sum) counts as -inf
(docs/design.md §4): it never makes an expert or a group preferred, and the reference applies the same rule.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import FLT_MAX, FP8_MAX, SCALE_EPS
from ._numerics import _abs_bits, _from_bits, _quantize, _scale_of
from .align import _align_program, _histograms, align_block_size, align_meta
from .configs import token_bucket
from .plan import launch

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the reference's clamp
_LOW_MASK = tl.constexpr(65535)  # low 16 bits of a packed key hold (65535 - expert id)
_KEY_MIN = tl.constexpr(-(2**63))  # removed / padded candidates: below every real score, -inf included
_FLT_MAX = tl.constexpr(FLT_MAX)


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same order (for non-NaN x; -inf maps above INT32_MIN)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack(x, idx):
    """[...] fp32 scores, [...] int32 ids -> [...] int64 keys: max() = best score, ties -> lowest id."""
    return (_ordered_key(x).to(tl.int64) << 32) + (65535 - idx).to(tl.int64)


@triton.jit(do_not_specialize=["T"])
def _topk_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, map_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, scratch_ptr,
    x_ptr, xq_ptr, xs_ptr,
    T, stride_t, stride_e, rsf, H, stride_xt, stride_qt, stride_st,
    E: tl.constexpr, GROUP_SIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, K_P2: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, BM: tl.constexpr, E_LOCAL: tl.constexpr, HAS_MAP: tl.constexpr,
    QUANT_X: tl.constexpr, XGROUP: tl.constexpr, XBLOCK: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
    EMULATE_FP8: tl.constexpr, ALIGN: tl.constexpr, EB: tl.constexpr, B_P2: tl.constexpr, NB: tl.constexpr,
    TILE: tl.constexpr, COUNT_TILE: tl.constexpr, LOG_EB: tl.constexpr,
):
    """logits: [T, E] any float (strided) -> weights: [T, TOP_K] fp32, ids: [T, TOP_K] int32.

    PAIR_BLOCKS: also the GEMMs' alignment with one pair per block (``pair_block_alignment``): sorted
    [T·TOP_K·BM] int32, expert_ids [T·TOP_K] int32 (local id, -1 when ``map`` [E] int32 drops it),
    npp [1] int32. ALIGN (one program, T <= BLOCK_T): also the GEMMs' alignment for block size BM, the layout
    and bits of ``align_block_size`` (``align._align_program`` on every pair as one chunk; scratch [1, 3, EB]
    int32). QUANT_X: also GEMM1's fp8 input, ``quantize_activation``'s bits: x [T, H] -> xq [T, H]
    fp8 e4m3fn, xs [T, cdiv(H, XGROUP)] fp32 (one group a step, in XBLOCK = next_pow2(XGROUP) lanes) or
    [T, 1] (XGROUP = 0: per token, the row read twice in XBLOCK chunks: amax, then quantize)."""
    pid = tl.program_id(0)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    offs_g = tl.arange(0, GP)
    offs_j = tl.arange(0, GS)
    col = offs_g[:, None] * GROUP_SIZE + offs_j[None, :]  # [GP, GS] expert id
    mask_e = (offs_g[:, None] < NUM_GROUPS) & (offs_j[None, :] < GROUP_SIZE)
    col3 = col[None, :, :]
    mask3 = mask_t[:, None, None] & mask_e[None, :, :]

    ptrs = logits_ptr + offs_t[:, None, None] * stride_t + col3.to(tl.int64) * stride_e
    x = tl.load(ptrs, mask=mask3, other=0.0).to(tl.float32)
    # NaN -> -inf, +-Inf -> +-FLT_MAX; then padded slots are -inf (score 0, never preferred).
    is_nan = x != x
    x = tl.where(x == float("inf"), _FLT_MAX, tl.where(x == float("-inf"), -_FLT_MAX, x))
    x = tl.where(is_nan, float("-inf"), x)
    x = tl.where(mask_e[None, :, :], x, float("-inf"))

    if SIGMOID:
        s = tl.sigmoid(x)
    else:
        row_max = tl.max(tl.max(x, axis=2), axis=1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # all-NaN row: scores 0, not NaN
        ex = tl.exp(x - row_max[:, None, None])
        denom = tl.maximum(tl.sum(tl.sum(ex, axis=2), axis=1), _TINY)
        s = ex / denom[:, None, None]
    s = tl.where(mask_e[None, :, :], s, 0.0)

    sel = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + col, mask=mask_e, other=0.0).to(tl.float32)
        sel = s + b[None, :, :]
        sel = tl.where(sel != sel, float("-inf"), sel)  # NaN bias: never preferred (§4)
    sel = tl.where(mask_e[None, :, :], sel, float("-inf"))

    if GROUPED:
        gmax = tl.max(sel, axis=2)  # [BLOCK_T, GP]
        if HAS_BIAS:  # group score = sum of the top-2 (the first max removed once, lowest index)
            first = tl.min(tl.where(sel == gmax[:, :, None], offs_j[None, None, :], GS), axis=2)
            rest = tl.where(offs_j[None, None, :] == first[:, :, None], float("-inf"), sel)
            gscore = gmax + tl.max(rest, axis=2)
            gscore = tl.where(gscore != gscore, float("-inf"), gscore)  # inf + -inf (§4)
        else:
            gscore = gmax
        gkey = _pack(gscore, offs_g[None, :])
        gkey = tl.where(offs_g[None, :] < NUM_GROUPS, gkey, _KEY_MIN)
        keep = tl.zeros([BLOCK_T, GP], dtype=tl.int1)
        for _ in range(TOPK_GROUP):
            best = tl.max(gkey, axis=1)
            g = 65535 - (best & 65535).to(tl.int32)
            hit = offs_g[None, :] == g[:, None]
            keep = keep | hit
            gkey = tl.where(hit, _KEY_MIN, gkey)
        sel = tl.where(keep[:, :, None], sel, float("-inf"))

    key = _pack(sel, col3)
    key = tl.where(mask_e[None, :, :], key, _KEY_MIN)  # padding: below every real -inf
    offs_k = tl.arange(0, K_P2)
    w_acc = tl.zeros([BLOCK_T, K_P2], dtype=tl.float32)
    id_acc = tl.zeros([BLOCK_T, K_P2], dtype=tl.int32)
    for i in range(TOP_K):
        best = tl.max(tl.max(key, axis=2), axis=1)
        e = 65535 - (best & 65535).to(tl.int32)
        hit = col3 == e[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=2), axis=1)  # unbiased score of the winner
        key = tl.where(hit, _KEY_MIN, key)
        w_acc = tl.where(offs_k[None, :] == i, w[:, None], w_acc)
        id_acc = tl.where(offs_k[None, :] == i, e[:, None], id_acc)
    if RENORMALIZE:
        total = tl.maximum(tl.sum(w_acc, axis=1), _TINY)
        w_acc = w_acc / total[:, None]
    w_acc = w_acc * tl.cast(rsf, tl.float32)

    out = offs_t[:, None] * TOP_K + offs_k[None, :]
    mask_out = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out, w_acc, mask=mask_out)
    tl.store(ids_ptr + out, id_acc, mask=mask_out)
    if PAIR_BLOCKS:
        local = id_acc
        if HAS_MAP:
            local = tl.load(map_ptr + id_acc, mask=mask_out, other=-1)
        local = tl.where((local >= 0) & (local < E_LOCAL), local, -1)
        tl.store(expert_ids_ptr + out, local, mask=mask_out)
        numel = T * TOP_K
        for r in tl.static_range(BM):  # slot 0 of pair j's block is j, the rest padding (the sentinel numel)
            tl.store(sorted_ptr + out * BM + r, tl.where(r == 0, out, numel).to(tl.int32), mask=mask_out)
        if pid == 0:
            tl.store(npp_ptr, (numel * BM).to(tl.int32))
    if ALIGN:
        tl.debug_barrier()  # the ids stored above are read back by other threads of this program
        numel = T * TOP_K
        totals, prior = _histograms(ids_ptr, map_ptr, 0, numel, 0, numel, E, EB, COUNT_TILE, HAS_MAP)
        max_padded = numel + E * (BM - 1)
        max_blocks = tl.cdiv(max_padded, BM)
        _align_program(ids_ptr, map_ptr, scratch_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, totals, prior, pid, 0,
                       numel, tl.cdiv(numel, TILE) * TILE, max_blocks, max_blocks, max_padded, E, EB, BM, B_P2, NB,
                       TILE, LOG_EB, HAS_MAP)
    if QUANT_X:  # the stores stay in this body: torch.compile's mutation analysis reads them here
        x_row = x_ptr + offs_t * stride_xt
        q_row = xq_ptr + offs_t * stride_qt
        STEP: tl.constexpr = XGROUP if XGROUP > 0 else XBLOCK  # columns a step: a group, or a chunk
        lane = tl.arange(0, XBLOCK)
        if XGROUP == 0:
            amax = tl.zeros([BLOCK_T], dtype=tl.int32)  # bits of |x|: the integer max keeps NaN
            for h0 in range(0, H, STEP):
                cols = h0 + lane
                m = mask_t[:, None] & (cols < H)[None, :]
                y = tl.load(x_row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(_abs_bits(y), axis=1))
            scale, inv = _scale_of(_from_bits(amax), QMAX, EPS)
            tl.store(xs_ptr + offs_t * stride_st, scale, mask=mask_t)
        for h0 in range(0, H, STEP):
            cols = h0 + lane
            m = mask_t[:, None] & ((cols < H) & (lane < STEP))[None, :]
            y = tl.load(x_row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if XGROUP > 0:  # one scale per group
                scale, inv = _scale_of(_from_bits(tl.max(_abs_bits(y), axis=1)), QMAX, EPS)
                tl.store(xs_ptr + offs_t * stride_st + h0 // XGROUP, scale, mask=mask_t)
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
    pair_blocks: tuple | None = None,
    quant_x: tuple | None = None,
    align: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] bf16/fp16/fp32 (any strides) -> (topk_weights [T, k] fp32, topk_ids [T, k] int32).

    Arguments are assumed validated (E <= 65535, k <= E, E % G == 0, E > G, topk_group <= G);
    ``e_score_correction_bias``: [E] fp32 or None. One launch, grid ``cdiv(T, BLOCK_T)``; T is not specialized.
    ``pair_blocks``: ((sorted_ids, expert_ids, num_post_pad) from ``pair_block_alignment``, block_m, local
    experts, expert_map or None): the kernel also fills them. ``align``: ((sorted_ids, expert_ids,
    num_post_pad) from ``align.align_buffers`` for T·k pairs and the logits' E, block_m, expert_map or None),
    where ``one_program(T, E, num_expert_group)``: the kernel also writes ``align_block_size``'s alignment into
    them (its launch goes). ``quant_x``: (x [T, H], q, scale, group) with q
    and scale from ``activation.quant_buffers`` (group 0: per token): the kernel also writes
    ``quantize_activation(x)`` into them, bitwise (GEMM1's fp8 input without a launch of its own)."""
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty((T, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    if T == 0:
        return weights, ids
    grouped, groups, group_size, gp, gs, block_t = _tiles(E, num_expert_group)
    bias = e_score_correction_bias
    grid = (triton.cdiv(T, block_t),)
    # every constexpr passed (no defaults): torch.compile's analysis of the kernel needs them all
    extra = dict(PAIR_BLOCKS=False, BM=1, E_LOCAL=1, HAS_MAP=False)
    if pair_blocks is not None:
        (sorted_ids, expert_ids, npp), block_m, num_local, expert_map = pair_blocks
        extra = dict(PAIR_BLOCKS=True, BM=block_m, E_LOCAL=num_local, HAS_MAP=expert_map is not None)
    elif align is not None:
        assert T <= block_t, "align: one program must route every token (one_program)"
        (sorted_ids, expert_ids, npp), block_m, expert_map = align
        extra = dict(PAIR_BLOCKS=False, BM=block_m, E_LOCAL=1, HAS_MAP=expert_map is not None)
    else:
        sorted_ids = expert_ids = npp = expert_map = None
    meta = align_meta(E, extra["BM"], extra["HAS_MAP"])
    align_kw = dict(ALIGN=align is not None, **{k: meta[k] for k in ("EB", "B_P2", "NB", "TILE", "COUNT_TILE", "LOG_EB")})
    scratch = torch.empty((1, 3, meta["EB"]), dtype=torch.int32, device=dev) if align is not None else None
    x = xq = xs = None
    xq_kw = dict(QUANT_X=False, XGROUP=0, XBLOCK=16, QMAX=FP8_MAX, EPS=SCALE_EPS, EMULATE_FP8=False)
    if quant_x is not None:
        x, xq, xs, group = quant_x
        # a group in a power-of-two chunk; per token, chunks of <= 4096 values a program (BLOCK_T rows)
        chunk = triton.next_power_of_2(group) if group else max(16, min(triton.next_power_of_2(x.shape[1]),
                                                                          4096 // block_t))
        xq_kw.update(QUANT_X=True, XGROUP=group, XBLOCK=chunk, EMULATE_FP8=interpret_mode())
    dummy = router_logits  # read-only: never a buffer the kernel writes (torch.compile would copy it)
    launch(_topk_route_kernel, grid,
        router_logits, bias if bias is not None else dummy, weights, ids,
        *(t if t is not None else dummy for t in (expert_map, sorted_ids, expert_ids, npp, scratch, x, xq, xs)),
        T, router_logits.stride(0), router_logits.stride(1), float(routed_scaling_factor),
        *((x.shape[1], x.stride(0), xq.stride(0), xs.stride(0)) if x is not None else (0, 0, 0, 0)),
        E=E, GROUP_SIZE=group_size, NUM_GROUPS=groups, TOPK_GROUP=topk_group if grouped else 1,
        TOP_K=top_k, K_P2=triton.next_power_of_2(top_k), GP=gp, GS=gs, BLOCK_T=block_t,
        SIGMOID=scoring_func == "sigmoid", HAS_BIAS=bias is not None, GROUPED=grouped,
        RENORMALIZE=bool(renormalize), **extra, **xq_kw, **align_kw, num_warps=4,
    )
    return weights, ids


def _tiles(E: int, num_expert_group: int) -> tuple:
    """The routing kernel's expert tile and tokens a program: (grouped, groups, group size, GP, GS, BLOCK_T)."""
    grouped = num_expert_group > 1  # G = 1 keeps its only group: the same as plain top-k
    groups = num_expert_group if grouped else 1
    gp, gs = triton.next_power_of_2(groups), triton.next_power_of_2(E // groups)
    return grouped, groups, E // groups, gp, gs, max(1, min(32, 2048 // (gp * gs)))


def one_program(T, E: int, num_expert_group: int) -> bool:
    """Whether one routing program routes every token of any T in T's token bucket (``configs.token_bucket``),
    so that it can also align them (``topk_route(..., align=...)``); a symbolic T is guarded to its bucket only."""
    return token_bucket(T) <= _tiles(E, num_expert_group)[-1]


def pair_block_alignment(T: int, top_k: int, block_m: int, device) -> tuple:
    """The GEMMs' alignment buffers for one (token, slot) pair per block, which the routing kernel fills
    (``topk_route(..., pair_blocks=...)``): sorted_ids [T·k·BM] (slot 0 of block j holds pair j, the rest the
    sentinel T·k), expert_ids [T·k] (the pair's local expert, -1 if not here), num_post_pad [1] = T·k·BM.
    Used at T = 1, where the pairs' experts are distinct, so the GEMMs read each expert's weights once, as with
    ``align_block_size``, and the alignment needs no launch of its own (docs/kernels.md)."""
    numel = T * top_k
    return (torch.empty(numel * block_m, dtype=torch.int32, device=device),
            torch.empty(numel, dtype=torch.int32, device=device), torch.empty(1, dtype=torch.int32, device=device))


def pair_blocks_of(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None) -> tuple:
    """``pair_block_alignment``'s layout (pair j alone at slot 0 of block j) for given ids [T, k], built with torch
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
