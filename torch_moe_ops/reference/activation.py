"""Reference activations (docs/design.md §6) and moe_sum (§8.2); fp32 math, output in the input dtype.
The formulas live on the ``Activation`` objects of the registry; these are the op-shaped entry points."""
from __future__ import annotations

import torch

from ..schemes import get_activation
from ..schemes.activations import gelu_erf, gelu_tanh  # noqa: F401  (re-exported for callers)


def act_and_mul_fp32(x: torch.Tensor, activation="silu", alpha: float | None = None,
                     limit: float | None = None) -> torch.Tensor:
    """x: [..., N] -> fp32 [..., N/2] for gated activations, [..., N] for ``*_no_mul``. ``activation`` is a
    name or an ``Activation``; None alpha/limit take the activation's defaults."""
    return get_activation(activation).reference(x, alpha, limit)


def act_and_mul(x: torch.Tensor, activation="silu", alpha: float | None = None, limit: float | None = None):
    return act_and_mul_fp32(x, activation, alpha, limit).to(x.dtype)


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """x: [T, k, H] -> [T, H], summed in fp32."""
    return x.float().sum(1).to(x.dtype)
