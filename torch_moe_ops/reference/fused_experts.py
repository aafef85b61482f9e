"""Reference fused experts (spec §8): per-expert loop, fp32 math, same quantization as the kernels."""
from __future__ import annotations

import torch

from .._spec import DEFAULT_BLOCK_SHAPE, EXPERT_SCHEMES
from .activation import act_and_mul_fp32
from .align import local_expert_ids
from .quant import dequantize_weight, fake_quantize_activation


def _expert_weight(w, scale, e, weight_scheme, block_shape):
    if weight_scheme is None:
        return w[e].float()
    return dequantize_weight(w[e : e + 1], scale[e : e + 1], weight_scheme, block_shape)[0]


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    quant_scheme: str = "none",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    block_shape=None,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    activation_alpha: float = 1.702,
    activation_limit: float = 0.0,
) -> torch.Tensor:
    """hidden_states: [T, H]; w13: [E, N1, H]; w2: [E, H, I]; topk_*: [T, k] -> [T, H] in x's dtype.

    ``out[t] = sum_slot w * (f(q(x) @ W13[e]^T + b13) @ W2[e]^T + b2)`` with activation quantization
    (per token, or per 1 x bk group for fp8_block) before each GEMM; non-local experts contribute 0.
    Scales must already have the canonical shapes (fp8_tensor: w13 [E, 1|2], w2 [E, 1])."""
    weight_scheme, act_scheme = EXPERT_SCHEMES[quant_scheme]
    block_shape = tuple(block_shape or DEFAULT_BLOCK_SHAPE)
    w13_scheme = weight_scheme
    if weight_scheme == "fp8_tensor" and activation == "swigluoai" and w13_scale.numel() == 2 * w13.shape[0]:
        # interleaved rows g0, u0, g1, u1, ...: row n takes the gate (n even) or up (n odd) scale (spec §3)
        w13_scale = w13_scale.reshape(-1, 2).repeat(1, w13.shape[1] // 2)
        w13_scheme = "fp8_channel"
    group = block_shape[1]
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
        h = fake_quantize_activation(a, act_scheme, group) @ _expert_weight(w13, w13_scale, e, w13_scheme, block_shape).T
        if w13_bias is not None:
            h = h + w13_bias[e].float()
        h = act_and_mul_fp32(h, activation, activation_alpha, activation_limit)
        y = fake_quantize_activation(h, act_scheme, group) @ _expert_weight(w2, w2_scale, e, weight_scheme, block_shape).T
        if w2_bias is not None:
            y = y + w2_bias[e].float()
        if not apply_router_weight_on_input:
            y = y * route_w
        out.index_add_(0, tok, y)
    return out.to(hidden_states.dtype)
