"""Reference activations (spec §6) and moe_sum (§8.2); fp32 math, output in the input dtype."""
from __future__ import annotations

import math

import torch

from .._spec import canonical_activation


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def act_and_mul_fp32(x: torch.Tensor, activation: str = "silu", alpha: float = 1.702, limit: float = 0.0):
    """x: [..., N] -> fp32 [..., N/2] for gated activations, [..., N] for ``*_no_mul``."""
    activation = canonical_activation(activation)
    x = x.float()
    if activation.endswith("_no_mul"):
        base = activation[: -len("_no_mul")]
        if base == "relu2":
            return torch.relu(x) ** 2
        return {"silu": torch.nn.functional.silu, "gelu": gelu_erf, "gelu_tanh": gelu_tanh}[base](x)
    if activation == "swigluoai":
        g, u = x[..., 0::2], x[..., 1::2]
        if limit > 0:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return (u + 1.0) * g * torch.sigmoid(alpha * g)
    half = x.shape[-1] // 2
    g, u = x[..., :half], x[..., half:]
    if limit > 0:  # clamped swiglu: gate from above only, up on both sides
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    f = {"silu": torch.nn.functional.silu, "gelu": gelu_erf, "gelu_tanh": gelu_tanh}[activation]
    return f(g) * u


def act_and_mul(x: torch.Tensor, activation: str = "silu", alpha: float = 1.702, limit: float = 0.0):
    return act_and_mul_fp32(x, activation, alpha, limit).to(x.dtype)


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """x: [T, k, H] -> [T, H], summed in fp32."""
    return x.float().sum(1).to(x.dtype)
