"""The ``torch.ops.moe`` custom ops. Importing this package registers them (and nothing else does)."""
from ._registry import REGISTERED
from .activation import act_and_mul
from .moe_sum import moe_sum
from .align import align_block_size
from .fused_moe import clear_launch_plans, fused_experts, fused_moe
from .linear import linear
from .quant import quantize_activation, quantize_weight, quantize_weight_into
from .routing import topk_route
from . import autograd  # noqa: E402,F401  (autograd formulas; the private backward and saving ops)

#: The names of the public ops this package registers under ``torch.ops.moe`` (private ones start with "_").
OP_NAMES = tuple(n for n in (q.split("::")[1] for q in REGISTERED) if not n.startswith("_"))

__all__ = [
    "clear_launch_plans",
    "OP_NAMES",
    "act_and_mul",
    "align_block_size",
    "fused_experts",
    "fused_moe",
    "linear",
    "moe_sum",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_into",
    "topk_route",
]
