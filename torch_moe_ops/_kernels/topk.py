"""The router's top-k as ``@triton.jit`` helpers (docs/design.md §4), shared by the routing kernel
(``routing._topk_route_kernel``, BLOCK_T tokens a program) and GEMM1 at T = 1 (``gemm._moe_gemm_kernel`` with
``PAIRS = 2``: every program routes the one token itself, so no routing launch runs; docs/kernels.md).

The expert axis is a 3-D tile ``[BLOCK_T, GP, GS]`` (``GP = next_pow2(num_expert_group)``, ``GS =
next_pow2(E / num_expert_group)``; plain top-k uses ``GP = 1``), so group scores are plain reductions over the
last axis and padded slots (experts past the group size, groups past ``G``) are masked. Selection packs each
candidate into one int64 key ``(order-preserving int32 of the fp32 score) << 32 | (65535 - expert)``, so a single
``max`` picks the largest score and, among equal scores, the LOWEST expert id (the reference's stable sort).

A NaN selection score (a NaN correction bias, or +inf + -inf in a group's top-two sum) counts as -inf
(docs/design.md §4): it never makes an expert or a group preferred, and the reference applies the same rule.

Same bits in every kernel: the two sums (the softmax's denominator, the renormalization) add in a fixed pairwise
tree (``_tree_sum``), not with ``tl.sum``, whose order follows the tile's thread layout (hence BLOCK_T and the
warps); every other step is a max, an elementwise op, or a sum with one nonzero term, exact in any order.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..schemes import FLT_MAX

_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the reference's clamp
_KEY_MIN = tl.constexpr(-(2**63))  # removed / padded candidates: below every real score, -inf included
_FLT_MAX = tl.constexpr(FLT_MAX)


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same order (for non-NaN x; -inf maps above INT32_MIN). Its own inverse."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack(x, idx):
    """[...] fp32 scores, [...] int32 ids -> [...] int64 keys: max() = best score, ties -> lowest id."""
    return (_ordered_key(x).to(tl.int64) << 32) + (65535 - idx).to(tl.int64)


@triton.jit
def _tree_sum(x):
    """[A, B, N] (N a power of two, at most 2**16) -> [A, B], the sum over the last axis added in a fixed pairwise
    tree (x[2i] + x[2i + 1], then the same on the halves): the same bits whatever the thread layout."""
    for _ in tl.static_range(16):
        if x.shape[2] > 1:
            lo, hi = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
            x = lo + hi
    return tl.sum(x, axis=2)  # one term: exact


@triton.jit
def route_rows(logits_ptr, bias_ptr, offs_t, mask_t, stride_t, stride_e, rsf,
               GROUP_SIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
               K_P2: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr,
               SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Top-k of the tokens ``offs_t`` [BLOCK_T] int64 (``mask_t``: real ones) of logits [T, E] (any float, strided):
    sanitize, score, correction bias ``bias_ptr`` [E], grouped top-k, renormalize, scale by ``rsf`` ->
    (weights [BLOCK_T, K_P2] fp32, ids [BLOCK_T, K_P2] int32; columns past TOP_K are 0)."""
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
        denom = tl.maximum(tl.sum(_tree_sum(_tree_sum(ex)[:, None, :]), axis=1), _TINY)
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
        if HAS_BIAS:  # the unbiased score of the winner
            w = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=2), axis=1)
        else:  # the key holds it: its high half is the score's ordered bits (one reduction fewer)
            w = _ordered_key((best >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        key = tl.where(hit, _KEY_MIN, key)
        w_acc = tl.where(offs_k[None, :] == i, w[:, None], w_acc)
        id_acc = tl.where(offs_k[None, :] == i, e[:, None], id_acc)
    if RENORMALIZE:
        total = tl.maximum(tl.sum(_tree_sum(w_acc[:, None, :]), axis=1), _TINY)
        w_acc = w_acc / total[:, None]
    return w_acc * tl.cast(rsf, tl.float32), id_acc


def route_constexprs(E: int, top_k: int, renormalize: bool, scoring_func: str, num_expert_group: int,
                     topk_group: int, has_bias: bool) -> dict:
    """``route_rows``' constexprs but BLOCK_T (every constexpr passed: torch.compile's analysis needs them all)."""
    grouped, groups, group_size, gp, gs = expert_tile(E, num_expert_group)
    return dict(GROUP_SIZE=group_size, NUM_GROUPS=groups, TOPK_GROUP=topk_group if grouped else 1, TOP_K=top_k,
                K_P2=triton.next_power_of_2(top_k), GP=gp, GS=gs, SIGMOID=scoring_func == "sigmoid",
                HAS_BIAS=has_bias, GROUPED=grouped, RENORMALIZE=bool(renormalize))


def expert_tile(E: int, num_expert_group: int) -> tuple:
    """The expert axis as a tile: (grouped, groups, group size, GP, GS)."""
    grouped = num_expert_group > 1  # G = 1 keeps its only group: the same as plain top-k
    groups = num_expert_group if grouped else 1
    return grouped, groups, E // groups, triton.next_power_of_2(groups), triton.next_power_of_2(E // groups)
