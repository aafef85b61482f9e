"""A batch-invariant dense linear (docs/batch-invariance.md): ``x [T, K] @ weight [N, K]ᵀ + bias`` through the
grouped GEMM as one expert that every token routes to, with the invariant tiles (``configs.invariant_config``).
Each row is then computed the same way whatever T; cuBLAS, which picks kernels (and split-K) by shape, gives no
such promise. Used for MoE routers under the mode (``moe::linear``)."""
from __future__ import annotations

import torch

from ..schemes import QUANT_SCHEMES
from .configs import get_config
from .gemm import invoke_moe_gemm
from .routing import invariant_alignment

_NONE = QUANT_SCHEMES["none"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [T, K]; weight: [N, K] in x's dtype, K contiguous; bias: [N] or None -> [T, N] in x's dtype."""
    T, K = x.shape
    N = weight.shape[0]
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return out
    cfg = get_config(T, 1, N, K, _NONE, None, x.device, top_k=1, invariant=True, dtype=x.dtype)
    ids = torch.zeros((T, 1), dtype=torch.int32, device=x.device)  # every row to the one expert
    align = invariant_alignment(ids, 1, cfg.block_m, None, True)
    return invoke_moe_gemm(x, weight.unsqueeze(0), out, *align, top_k=1, config=cfg, scheme=_NONE,
                           bias=None if bias is None else bias.unsqueeze(0))
