"""A batch-invariant dense linear (docs/batch-invariance.md): ``x [T, K] @ weight [N, K]ᵀ + bias`` through the
grouped GEMM as one expert that every token routes to, with the invariant tiles (``configs.invariant_config``).
Each row is then computed the same way whatever T; cuBLAS, which picks kernels (and split-K) by shape, gives no
such promise. Used for MoE routers under the mode (``moe::linear``)."""
from __future__ import annotations

import torch

from .._platform import interpret_mode
from ..schemes import QUANT_SCHEMES, cdiv
from .configs import get_config
from .gemm import invoke_moe_gemm

_NONE = QUANT_SCHEMES["none"]


def _one_expert_alignment(T: int, block_m: int, device, pair_blocks: bool) -> tuple:
    """Every row j to expert 0: sorted_ids [cdiv(T, BM)·BM] (j, then the sentinel T), expert_ids all 0,
    num_post_pad [1]. ``pair_blocks``: row j alone at slot 0 of block j (the interpreter's dot rounds a row by
    its place in the tile)."""
    if pair_blocks:
        sorted_ids = torch.full((T * block_m,), T, dtype=torch.int32, device=device)
        sorted_ids[::block_m] = torch.arange(T, dtype=torch.int32, device=device)
        blocks = T
    else:
        blocks = cdiv(T, block_m)
        slots = torch.arange(blocks * block_m, dtype=torch.int32, device=device)
        sorted_ids = torch.where(slots < T, slots, torch.full_like(slots, T))
    expert_ids = torch.zeros(blocks, dtype=torch.int32, device=device)
    return sorted_ids, expert_ids, torch.full((1,), blocks * block_m, dtype=torch.int32, device=device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [T, K]; weight: [N, K] in x's dtype, K contiguous; bias: [N] or None -> [T, N] in x's dtype."""
    T, K = x.shape
    N = weight.shape[0]
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return out
    cfg = get_config(T, 1, N, K, _NONE, None, x.device, top_k=1, invariant=True, dtype=x.dtype)
    align = _one_expert_alignment(T, cfg.block_m, x.device, interpret_mode())
    return invoke_moe_gemm(x, weight.unsqueeze(0), out, *align, top_k=1, config=cfg, scheme=_NONE,
                           bias=None if bias is None else bias.unsqueeze(0))
