"""torch-moe-ops: Mixture-of-Experts ops for ``torch.compile``, registered under ``torch.ops.moe``."""
from . import reference
from ._spec import ACTIVATIONS, EXPERT_SCHEMES, WEIGHT_SCHEMES
from .ops import (
    OP_NAMES,
    act_and_mul,
    align_block_size,
    fused_experts,
    fused_moe,
    moe_sum,
    quantize_activation,
    quantize_weight,
    quantize_weight_into,
    topk_route,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "EXPERT_SCHEMES",
    "OP_NAMES",
    "WEIGHT_SCHEMES",
    "act_and_mul",
    "align_block_size",
    "fused_experts",
    "fused_moe",
    "moe_sum",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_into",
    "reference",
    "topk_route",
]
