"""Pure-PyTorch references: fp32-accumulating, short, written from docs/design.md. They back the CPU kernels."""
from .activation import act_and_mul, moe_sum
from .align import align_block_size
from .fused_experts import fused_experts
from .quant import dequantize_activation, dequantize_weight, quantize_activation, quantize_weight
from .routing import topk_route

__all__ = [
    "act_and_mul",
    "align_block_size",
    "dequantize_activation",
    "dequantize_weight",
    "fused_experts",
    "moe_sum",
    "quantize_activation",
    "quantize_weight",
    "topk_route",
]
