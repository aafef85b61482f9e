"""moe_sum (docs/design.md §8.2): each token's k expert outputs summed in fp32, optionally skipping the slots
of dropped pairs (ids outside [0, E) or mapped to −1), which the pipeline leaves unwritten; and the same sum done
by GEMM2's last program of a column block (``sum_pairs`` at T = 1, ``sum_tokens`` on aligned rows, ``SlotSum``;
docs/kernels.md, "GEMM2 sums the slots"), one order of additions for all of them (``sum_slots``)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from ..schemes import cdiv
from ._numerics import _bf16_round
from .formats import pair_expert
from .plan import launch


@triton.jit(do_not_specialize=["T"])
def _moe_sum_kernel(x_ptr, out_ptr, ids_ptr, map_ptr, T, H, E, stride_xt, stride_xk, stride_ot, stride_it, stride_ik,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_BF16: tl.constexpr,
                    MASKED: tl.constexpr, HAS_MAP: tl.constexpr):
    """x: [T, TOP_K, H] -> out: [T, H], fp32 accumulation in slot order (``sum_slots``, shared with GEMM2's
    fused sum); grid (T, H-blocks). With MASKED, slot j of token t counts only if ids[t, j] is in [0, E) (and
    map[ids] >= 0): other slots are never read (may hold garbage)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    y = sum_slots(x_ptr + t * stride_xt, stride_xk, offs_h, mask_h, ids_ptr + t * stride_it, stride_ik, map_ptr, E,
                  TOP_K, MASKED, HAS_MAP, False)
    if EMULATE_BF16:
        y = _bf16_round(y)
    tl.store(out_ptr + t * stride_ot + offs_h, y.to(out_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def sum_slots(x_ptr, stride_xk, offs, mask, ids_ptr, stride_ik, map_ptr, E, TOP_K: tl.constexpr,
              MASKED: tl.constexpr, HAS_MAP: tl.constexpr, FROM_L2: tl.constexpr):
    """sum over slots j < TOP_K of x[j, offs] -> [BLOCK] fp32, one slot after the other, so that ``moe_sum`` and
    GEMM2's fused sum round alike. MASKED: slot j counts only if ids[j] is in [0, E) (and map[ids[j]] in [0, E));
    others are never read. FROM_L2: loads bypass L1 (the slots were written by other programs of this kernel)."""
    y = tl.zeros(offs.shape, dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        m = mask
        if MASKED:  # the alignment's rule for dropped pairs
            m = tl.where(pair_expert(tl.load(ids_ptr + j * stride_ik), map_ptr, E, E, HAS_MAP) >= 0, mask, False)
        if FROM_L2:
            v = tl.load(x_ptr + j * stride_xk + offs, mask=m, other=0.0, cache_modifier=".cg")
        else:
            v = tl.load(x_ptr + j * stride_xk + offs, mask=m, other=0.0)
        y += v.to(tl.float32)
    return y


@triton.jit
def sum_pairs(c_ptr, stride_cm, stride_cn, sum_ptr, count_ptr, pid_n, offs_cn, N, SUM_PAIRS: tl.constexpr,
              BF16_RTNE: tl.constexpr):
    """GEMM2's fused sum at T = 1 (one pair a row block: row j of c is pair j; docs/kernels.md, "GEMM2 sums the
    slots"): the program that stores the last of the SUM_PAIRS tiles of its column block (a counter a column
    block, released after the CTA's stores, acquired before the loads) sums rows 0..SUM_PAIRS-1 of c in slot
    order, as ``moe_sum`` does, into sum [N]."""
    tl.debug_barrier()  # every thread's stores happen before the release
    done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if done == SUM_PAIRS - 1:
        mask_n = offs_cn < N
        y = sum_slots(c_ptr, stride_cm, offs_cn * stride_cn, mask_n, count_ptr, 0, count_ptr, 0, SUM_PAIRS, False,
                      False, True)
        if BF16_RTNE:
            y = _bf16_round(y)
        tl.store(sum_ptr + offs_cn, y.to(sum_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def sum_tokens(c_ptr, stride_cm, stride_cn, sum_ptr, count_ptr, local, offs_token, mask_token, pid_n, offs_cn, N,
               SUM_K: tl.constexpr, SUM_KP2: tl.constexpr, BF16_RTNE: tl.constexpr):
    """GEMM2's fused sum on aligned rows (T ≤ SUM_T; docs/kernels.md, "GEMM2 sums the slots"): each row's pair
    counts itself on its token's counter of this column block (``count_ptr`` [T, cdiv(N, BN)], released after the
    CTA's stores, acquired before the loads); a row that brings the count to its token's number of local slots
    (``local`` [BM, SUM_KP2], ``local_slots``) sums that token's local rows of c in slot order (``sum_slots``'
    order: moe_sum's bits) into ``sum_ptr`` [T, N]. A token's slots have distinct experts, so no two rows of a
    tile share a token."""
    tl.debug_barrier()  # every thread's stores happen before the release
    tok = offs_token // SUM_K  # [BM]
    n_cb = tl.cdiv(N, offs_cn.shape[0])
    old = tl.atomic_add(count_ptr + tok * n_cb + pid_n, tl.full(tok.shape, 1, tl.int32), mask=mask_token,
                        sem="acq_rel", scope="gpu")
    done = mask_token & (old == tl.sum(local.to(tl.int32), axis=1) - 1)  # [BM]
    tl.debug_barrier()  # the acquiring threads' view before any thread's loads
    mask_n = offs_cn < N
    offs_s = tl.arange(0, SUM_KP2)
    y = tl.zeros((offs_token.shape[0], offs_cn.shape[0]), dtype=tl.float32)
    for j in tl.static_range(SUM_K):  # slot order, dropped slots never read (0 added): sum_slots' arithmetic
        lj = tl.sum(tl.where(offs_s[None, :] == j, local, False).to(tl.int32), axis=1) > 0  # [BM]
        m = (done & lj)[:, None] & mask_n[None, :]
        v = tl.load(c_ptr + (tok * SUM_K + j)[:, None] * stride_cm + offs_cn[None, :] * stride_cn, mask=m,
                    other=0.0, cache_modifier=".cg")
        y += v.to(tl.float32)
    if BF16_RTNE:
        y = _bf16_round(y)
    tl.store(sum_ptr + tok[:, None] * N + offs_cn[None, :], y.to(sum_ptr.dtype.element_ty),
             mask=done[:, None] & mask_n[None, :])


@triton.jit
def local_slots(ids_ptr, map_ptr, tok, mask, SUM_K: tl.constexpr, SUM_KP2: tl.constexpr, E_IDS, E_LOCAL,
                HAS_MAP: tl.constexpr):
    """Which of the SUM_K slots of tokens ``tok`` [R] (rows of ``ids_ptr`` [T, SUM_K]) hold a local pair (the
    alignment's rule, ``pair_expert``): [R, SUM_KP2] bool, False past SUM_K and where ``mask`` is False."""
    offs_s = tl.arange(0, SUM_KP2)
    m = mask[:, None] & (offs_s < SUM_K)[None, :]
    raw = tl.load(ids_ptr + tok[:, None] * SUM_K + offs_s[None, :], mask=m, other=-1)
    return m & (pair_expert(raw, map_ptr, E_IDS, E_LOCAL, HAS_MAP) >= 0)


class SlotSum(NamedTuple):
    """GEMM2 also writes ``moe_sum``'s output (``invoke_moe_gemm``'s ``sum_into``): ``out`` [T, N] in c's dtype,
    ``counts`` [T·cdiv(N, BLOCK_N)] int32 counters (cleared by GEMM1); on aligned rows also ``topk_ids`` [T, k]
    (contiguous), the ``expert_map`` or None, and ``max_tokens``, a static bound on T (the token bucket); without
    ``topk_ids``, T = 1 with one pair a row block."""
    out: torch.Tensor
    counts: torch.Tensor
    topk_ids: torch.Tensor | None = None
    expert_map: torch.Tensor | None = None
    max_tokens: int = 1


def moe_sum(x: torch.Tensor, out: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None, num_experts: int = 0) -> torch.Tensor:
    """x: [T, k, H] (``stride(-1) == 1``) -> out: [T, H] in x's dtype (or out's), summed in fp32.

    With ``topk_ids`` [T, k] int32/int64, slots whose id is outside [0, num_experts) or maps to −1 in
    ``expert_map`` [num_experts] int32 are skipped without being read (the pipeline leaves them unwritten)."""
    T, k, H = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return out
    bh = min(triton.next_power_of_2(H), max(128, 4096 // triton.next_power_of_2(k)))
    masked = topk_ids is not None
    ids = topk_ids if masked else x  # any pointer: unused unless MASKED
    emulate_bf16 = out.dtype == torch.bfloat16 and interpret_mode()
    launch(_moe_sum_kernel, (T, cdiv(H, bh)),
        x, out, ids, expert_map if expert_map is not None else ids, T, H, num_experts,
        x.stride(0), x.stride(1), out.stride(0), ids.stride(0) if masked else 0, ids.stride(1) if masked else 0,
        TOP_K=k, BLOCK_H=bh, EMULATE_BF16=emulate_bf16,
        MASKED=masked, HAS_MAP=expert_map is not None, num_warps=4)
    return out
