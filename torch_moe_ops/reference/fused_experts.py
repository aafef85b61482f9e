"""Reference fused experts (docs/design.md §8): per-expert loop, fp32 math, same quantization as the kernels."""
from __future__ import annotations

import torch

from ..schemes import get_activation, get_quant_scheme
from .align import local_expert_ids
from .invariant import rows_times, rowwise
from .quant import fake_quantize_activation


def _expert_weight(w, scale, e, fmt, block, interleaved_halves=False):
    """Expert e's weight dequantized: fp32 [N, K]."""
    if fmt is None:
        return w[e].float()
    if interleaved_halves:  # rows g0, u0, g1, u1, ...: row n takes the gate (n even) or up (n odd) scale
        return fmt.codec.decode(w[e]) * scale[e].reshape(2).repeat(w.shape[1] // 2)[:, None]
    return fmt.dequantize(w[e : e + 1], scale[e : e + 1], block)[0]


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation="silu",
    quant_scheme="none",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    block_shape=None,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    activation_alpha: float | None = None,
    activation_limit: float | None = None,
    *,
    invariant: bool = False,
) -> torch.Tensor:
    """hidden_states: [T, H]; w13: [E, N1, H / pack]; w2: [E, H, I / pack]; topk_*: [T, k] -> [T, H] in x's dtype.

    ``out[t] = sum_slot w * (f(q(x) @ W13[e]^T + b13) @ W2[e]^T + b2)`` with activation quantization
    (per token, or per 1 x bk group for fp8_block) before each GEMM; non-local experts contribute 0.
    ``activation`` / ``quant_scheme``: names or registry objects. Scales must already have the kernels'
    shapes (fp8_tensor: w13 [E, 1|2], w2 [E, 1]; channel [E, N]; tiled [E, N/bn, K/bk]). ``invariant``: every
    row bitwise independent of the batch (``rows_times``); the rest of the math already is (per-row activation
    scales, elementwise epilogues, a token's experts added in ascending id order)."""
    act = get_activation(activation)
    scheme = get_quant_scheme(quant_scheme)
    block = scheme.block_shape(block_shape)
    fmt = scheme.weight
    halves = fmt is not None and fmt.sharded and act.interleaved and w13_scale.numel() == 2 * w13.shape[0]
    act_q, group = scheme.act, scheme.act_group(block)
    T, H = hidden_states.shape
    k = topk_ids.shape[1]
    local = local_expert_ids(topk_ids, w13.shape[0] if expert_map is None else expert_map.numel(), expert_map)
    local = local.view(T, k)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device)
    for e in local.unique().tolist():
        if e < 0:
            continue
        tok, slot = (local == e).nonzero(as_tuple=True)
        route_w = topk_weights[tok, slot].float()[:, None]
        a = hidden_states[tok].float()
        if apply_router_weight_on_input:
            a = a * route_w
        h = rows_times(fake_quantize_activation(a, act_q, group), _expert_weight(w13, w13_scale, e, fmt, block, halves),
                       invariant)
        if w13_bias is not None:
            h = h + w13_bias[e].float()
        h = rowwise(lambda t: act.reference(t, activation_alpha, activation_limit), h, invariant)
        y = rows_times(fake_quantize_activation(h, act_q, group), _expert_weight(w2, w2_scale, e, fmt, block),
                       invariant)
        if w2_bias is not None:
            y = y + w2_bias[e].float()
        if not apply_router_weight_on_input:
            y = y * route_w
        out.index_add_(0, tok, y)
    return out.to(hidden_states.dtype)
