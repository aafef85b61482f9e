"""``moe::act_and_mul`` (spec §6) and ``moe::moe_sum`` (§8.2)."""
from __future__ import annotations

import torch

from .. import reference
from .._spec import canonical_activation
from . import _checks as C
from ._registry import define, use_triton_on_cpu

ACT_SCHEMA = "(Tensor x, str activation=\"silu\", float alpha=1.702, float limit=0.0) -> Tensor"
SUM_SCHEMA = "(Tensor x) -> Tensor"


def check_act(x, activation, limit):
    activation = canonical_activation(activation)
    C.check_tensor(x, "x", dim=(2, 3), dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    C.check(limit >= 0, f"limit must be >= 0 (0 disables clamping), got {limit}")
    if not activation.endswith("_no_mul"):
        C.check(x.shape[-1] % 2 == 0, f"x's last dim must be even for the gated activation {activation!r}, got {x.shape[-1]}")
    return activation


def act_out_shape(x, activation):
    return x.shape if activation.endswith("_no_mul") else (*x.shape[:-1], x.shape[-1] // 2)


def act(x, activation, alpha, limit, on_triton):
    activation = check_act(x, activation, limit)
    if on_triton:
        from .._kernels import activation as kernels

        flat = x.reshape(-1, x.shape[-1])
        return kernels.act_and_mul(flat, activation, alpha, limit).view(act_out_shape(x, activation))
    return reference.act_and_mul(x, activation, alpha, limit).contiguous()  # the fake is contiguous for any x layout


@define("act_and_mul", ACT_SCHEMA)
def _act_and_mul(x, activation="silu", alpha=1.702, limit=0.0):
    return act(x, activation, alpha, limit, on_triton=True)


@_act_and_mul.register_kernel("cpu")
def _act_and_mul_cpu(x, activation="silu", alpha=1.702, limit=0.0):
    return act(x, activation, alpha, limit, on_triton=use_triton_on_cpu())


@_act_and_mul.register_fake
def _act_and_mul_fake(x, activation="silu", alpha=1.702, limit=0.0):
    activation = check_act(x, activation, limit)
    return x.new_empty(act_out_shape(x, activation))


def check_sum(x):
    C.check_tensor(x, "x", dim=3, dtypes=C.FLOAT_DTYPES, last_contiguous=True)


def summ(x, on_triton):
    check_sum(x)
    if on_triton:
        from .._kernels import activation as kernels

        return kernels.moe_sum(x)
    return reference.moe_sum(x)


@define("moe_sum", SUM_SCHEMA)
def _moe_sum(x):
    return summ(x, on_triton=True)


@_moe_sum.register_kernel("cpu")
def _moe_sum_cpu(x):
    return summ(x, on_triton=use_triton_on_cpu())


@_moe_sum.register_fake
def _moe_sum_fake(x):
    check_sum(x)
    return x.new_empty((x.shape[0], x.shape[2]))


def act_and_mul(x: torch.Tensor, activation: str = "silu", *, alpha: float = 1.702, limit: float = 0.0) -> torch.Tensor:
    """Apply an MoE activation in fp32 and cast back.

    Args:
        x: [T, N] or [T, k, N] bf16/fp16/fp32, last dim contiguous. Gated activations split N into gate
            and up halves (``swigluoai``: interleaved, gate = even columns).
        activation: silu, gelu, gelu_tanh (alias gelu_pytorch_tanh), swigluoai, or a ``*_no_mul`` form
            (silu_no_mul, gelu_no_mul, gelu_tanh_no_mul, relu2_no_mul).
        alpha: swigluoai's sigmoid slope.
        limit: > 0 clamps the gate from above and the up half on both sides (clamped swiglu).

    Returns:
        [T, N/2] (gated) or [T, N] (``*_no_mul``) in x's dtype.
    """
    return torch.ops.moe.act_and_mul(x, activation, alpha, limit)


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum the k expert outputs of each token: x [T, k, H] -> [T, H], fp32 accumulation, x's dtype."""
    return torch.ops.moe.moe_sum(x)
