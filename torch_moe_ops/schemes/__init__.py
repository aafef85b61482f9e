"""The scheme registry: every quantization scheme and activation as an object (docs/design.md §3, §6).

Names (the strings of the ``torch.ops.moe`` schemas) are resolved here, once, at the op boundary:

- ``get_quant_scheme("fp8_block")`` -> ``QuantScheme`` (``fused_experts``' ``quant_scheme``),
- ``get_weight_format("int4_group")`` -> ``WeightFormat`` (``quantize_weight``'s ``scheme``),
- ``get_activation_quant("fp8_token")`` -> ``ActivationQuant`` (``quantize_activation``'s ``scheme``),
- ``get_activation("silu")`` -> ``Activation``.

A scheme has one name that works everywhere: ``"int4_w4a16"`` (or ``"int4"``) is accepted by ``quantize_weight``
as well as ``fused_experts``, and ``"int4_group"`` by both too; the same for int8 (``*_ALIASES``).

Below the boundary, code asks the object (its dtype, scale shape, kernel flags, reference math) and never
compares names. Adding a scheme means adding an object here (plus its kernel feature, if new).
"""
from .activations import ACTIVATIONS, IDENTITY, SWIGLU_ALPHA, SWIGLU_LIMIT, Activation, get_activation
from .experts import (
    ACTIVATION_QUANTS,
    NONE,
    QUANT_SCHEME_ALIASES,
    QUANT_SCHEMES,
    ActivationQuant,
    GemmFlags,
    QuantScheme,
    get_activation_quant,
    get_quant_scheme,
)
from .numerics import FLT_MAX, FP8_DTYPE, FP8_MAX, INT4_MAX, INT4_MIN, INT8_MAX, SCALE_EPS, cdiv
from .weights import WEIGHT_FORMAT_ALIASES, WEIGHT_FORMATS, WeightFormat, get_weight_format

#: Routing score functions (``topk_route``'s ``scoring_func``).
SCORING_FUNCS = ("softmax", "sigmoid")
GATED_ACTIVATIONS = tuple(n for n, a in ACTIVATIONS.items() if a.gated)

__all__ = [
    "ACTIVATIONS", "ACTIVATION_QUANTS", "FLT_MAX", "FP8_DTYPE", "FP8_MAX", "GATED_ACTIVATIONS", "IDENTITY",
    "INT4_MAX", "INT4_MIN", "INT8_MAX", "NONE", "QUANT_SCHEME_ALIASES", "QUANT_SCHEMES", "SCALE_EPS", "SCORING_FUNCS", "SWIGLU_ALPHA", "SWIGLU_LIMIT",
    "WEIGHT_FORMAT_ALIASES", "WEIGHT_FORMATS", "Activation", "ActivationQuant", "GemmFlags", "QuantScheme", "WeightFormat", "cdiv",
    "get_activation", "get_activation_quant", "get_quant_scheme", "get_weight_format",
]
