"""``moe::act_and_mul`` (docs/design.md §6): the activation between the GEMMs as a standalone op."""
from __future__ import annotations

import torch

from .. import reference
from ..schemes import Activation, get_activation
from . import _checks as C
from ._registry import define, use_triton_on_cpu

ACT_SCHEMA = "(Tensor x, str activation=\"silu\", float? alpha=None, float? limit=None) -> Tensor"


def check_act(x, activation, alpha, limit) -> tuple[Activation, float, float]:
    act = get_activation(activation)
    C.check_tensor(x, "x", dim=(2, 3), dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    alpha, limit = act.alpha(alpha), act.limit(limit)
    C.check(limit >= 0, f"limit must be >= 0 (0 disables clamping), got {limit}")
    if act.gated:
        C.check(x.shape[-1] % 2 == 0, f"x's last dim must be even for the gated activation {act.name!r}, got {x.shape[-1]}")
    return act, alpha, limit


def act_out_shape(x, act: Activation):
    return (*x.shape[:-1], x.shape[-1] // 2) if act.gated else x.shape


def run_act(x, activation, alpha, limit, on_triton):
    act, alpha, limit = check_act(x, activation, alpha, limit)
    if on_triton:
        from .._kernels import activation as kernels

        flat = x.reshape(-1, x.shape[-1])
        return kernels.act_and_mul(flat, act, alpha, limit).view(act_out_shape(x, act))
    return reference.act_and_mul(x, act, alpha, limit).contiguous()  # the fake is contiguous for any x layout


@define("act_and_mul", ACT_SCHEMA)
def _act_and_mul(x, activation="silu", alpha=None, limit=None):
    return run_act(x, activation, alpha, limit, on_triton=True)


@_act_and_mul.register_kernel("cpu")
def _act_and_mul_cpu(x, activation="silu", alpha=None, limit=None):
    return run_act(x, activation, alpha, limit, on_triton=use_triton_on_cpu())


@_act_and_mul.register_fake
def _act_and_mul_fake(x, activation="silu", alpha=None, limit=None):
    act, _, _ = check_act(x, activation, alpha, limit)
    return x.new_empty(act_out_shape(x, act))


def act_and_mul(x: torch.Tensor, activation: str = "silu", *, alpha: float | None = None,
                limit: float | None = None) -> torch.Tensor:
    """Apply an MoE activation in fp32 and cast back.

    Args:
        x: [T, N] or [T, k, N] bf16/fp16/fp32, last dim contiguous. Gated activations split N into gate
            and up halves (``swigluoai``: interleaved, gate = even columns).
        activation: a name of ``torch_moe_ops.schemes.ACTIVATIONS`` (alias gelu_pytorch_tanh).
        alpha: swigluoai's sigmoid slope (None: 1.702).
        limit: > 0 clamps the gate from above and the up half on both sides (clamped swiglu); None takes
            the activation's default (7.0 for swigluoai, 0 = off otherwise).

    Returns:
        [T, N/2] (gated) or [T, N] (``*_no_mul``) in x's dtype.
    """
    return torch.ops.moe.act_and_mul(x, activation, alpha, limit)
