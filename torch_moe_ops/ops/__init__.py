"""The ``torch.ops.moe`` custom ops. Importing this package registers them (and nothing else does)."""
from ._registry import REGISTERED
from .activation import act_and_mul
from .moe_sum import moe_sum
from .align import align_block_size
from .fused_moe import fused_experts, fused_moe
from .quant import quantize_activation, quantize_weight, quantize_weight_into
from .routing import topk_route

#: The names of every op this package registers under ``torch.ops.moe``.
OP_NAMES = tuple(q.split("::")[1] for q in REGISTERED)

__all__ = [
    "OP_NAMES",
    "act_and_mul",
    "align_block_size",
    "fused_experts",
    "fused_moe",
    "moe_sum",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_into",
    "topk_route",
]
