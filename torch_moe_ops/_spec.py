"""Names and constants of the spec (``moe-semantics.md``) shared by references, kernels and ops."""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
#: Scale floor: every scale is ``max(amax, SCALE_EPS) / QMAX``, so an all-zero row/block gives q = 0, not NaN.
SCALE_EPS = 1e-4
FLT_MAX = torch.finfo(torch.float32).max
DEFAULT_BLOCK_SHAPE = (128, 128)

#: Gated activations take ``[.., 2I]`` and return ``[.., I]``.
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")
#: Non-gated activations keep the shape; their w13 is ``[E, I, H]``.
NO_MUL_ACTIVATIONS = ("silu_no_mul", "gelu_no_mul", "gelu_tanh_no_mul", "relu2_no_mul")
ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh"}
ACTIVATIONS = GATED_ACTIVATIONS + NO_MUL_ACTIVATIONS

WEIGHT_SCHEMES = ("fp8_tensor", "fp8_channel", "fp8_block", "int8_channel")
ACTIVATION_SCHEMES = ("fp8_token", "fp8_group")
#: ``fused_experts`` quant schemes -> (weight scheme, activation scheme or None).
EXPERT_SCHEMES = {
    "none": (None, None),
    "fp8_tensor": ("fp8_tensor", "fp8_token"),
    "fp8_channel": ("fp8_channel", "fp8_token"),
    "fp8_block": ("fp8_block", "fp8_group"),
    "int8_w8a16": ("int8_channel", None),
}
SCORING_FUNCS = ("softmax", "sigmoid")


def canonical_activation(name: str) -> str:
    """Resolve aliases and reject unknown names (``relu2`` is pointed at ``relu2_no_mul``)."""
    name = ACTIVATION_ALIASES.get(name, name)
    if name == "relu2":
        raise ValueError("activation='relu2' has no gated form; use activation='relu2_no_mul' with w13 [E, I, H]")
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (or 'gelu_pytorch_tanh'), got {name!r}")
    return name


def is_gated(activation: str) -> bool:
    return canonical_activation(activation) in GATED_ACTIVATIONS


def weight_qmax(scheme: str) -> float:
    return INT8_MAX if scheme.startswith("int8") else FP8_MAX


def weight_qdtype(scheme: str) -> torch.dtype:
    return torch.int8 if scheme.startswith("int8") else FP8_DTYPE


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
