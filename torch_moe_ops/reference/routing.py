"""Reference routing (docs/design.md §4): scoring, correction bias, grouped top-k, renormalize, scaling."""
from __future__ import annotations

import torch

from ..schemes import FLT_MAX
from .invariant import rowwise


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +-Inf -> +-FLT_MAX, in fp32 (docs/design.md §4.1)."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=FLT_MAX, neginf=-FLT_MAX)


def score(x: torch.Tensor, scoring_func: str, invariant: bool = False) -> torch.Tensor:
    """fp32 scores in [0, 1]. A row of all -inf (all-NaN logits) scores 0 everywhere instead of NaN.
    ``invariant`` (x [T, E]; the routing forward): each row takes the same code path whatever the batch
    (``rowwise``: torch's vectorized and scalar exp / sigmoid round differently, placed by the tensor's size)."""
    if invariant and x.dim() == 2:
        return rowwise(lambda t: _score(t, scoring_func), x)
    return _score(x, scoring_func)


def _score(x: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "sigmoid":
        return torch.sigmoid(x)
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(x - row_max)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    """A NaN selection score counts as -inf (docs/design.md §4): a NaN correction bias (or +inf + -inf in a
    group's top-two sum) never makes an expert or a group preferred. torch.sort would rank NaN first."""
    return x.masked_fill(torch.isnan(x), float("-inf"))


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; ties go to the lower index."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def topk_route(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    num_expert_group: int = 0,
    topk_group: int = 0,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] any float -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)."""
    s = score(sanitize_logits(router_logits), scoring_func, invariant=True)
    sel = s if e_score_correction_bias is None else nan_to_neg_inf(s + e_score_correction_bias.float())
    if num_expert_group > 0:
        T, E = sel.shape
        grouped = sel.view(T, num_expert_group, E // num_expert_group)
        if e_score_correction_bias is None:
            group_score = grouped.amax(-1)
        else:
            group_score = nan_to_neg_inf(stable_topk(grouped, 2)[0].sum(-1))
        _, keep = stable_topk(group_score, topk_group)
        keep_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        sel = grouped.masked_fill(~keep_mask[..., None], float("-inf")).view(T, E)
    _, ids = stable_topk(sel, top_k)
    weights = torch.gather(s, 1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return weights * routed_scaling_factor, ids.to(torch.int32)
