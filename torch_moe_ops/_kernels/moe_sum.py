"""moe_sum (docs/design.md §8.2): each token's k expert outputs summed in fp32, optionally skipping the slots
of dropped pairs (ids outside [0, E) or mapped to −1), which the pipeline leaves unwritten."""
from __future__ import annotations

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
