"""Benchmark shapes (issue: Triton kernels + benchmark runner) and the per-cell roofline."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoEShape:
    name: str
    E: int
    k: int
    H: int
    I: int
    activation: str = "silu"
    bias: bool = False
    schemes: tuple = ("none",)
    routing: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def n1(self) -> int:
        return self.I if self.activation.endswith("_no_mul") else 2 * self.I


SHAPES = {
    "qwen3-30b-a3b": MoEShape("Qwen3-30B-A3B", 128, 8, 2048, 768,
                              schemes=("none", "fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16")),
    "mixtral-8x7b": MoEShape("Mixtral-8x7B", 8, 2, 4096, 14336),
    "gpt-oss-20b": MoEShape("GPT-OSS-20B", 32, 4, 2880, 2880, activation="swigluoai", bias=True),
    "deepseek-v3": MoEShape("DeepSeek-V3", 256, 8, 7168, 2048, schemes=("fp8_block",),
                            routing=dict(num_expert_group=8, topk_group=4, scoring_func="sigmoid")),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

#: ~1 G-element bf16 w13 tensors [E, 2 * I, H] for online quantization: one (expert, shard) slice is
#: 3 MB (Qwen3), 29 MB (DeepSeek-V3) and 117 MB (Mixtral) of bf16 -- below, near and above the H100's 50 MB L2.
QUANT_SHAPES = {"qwen3-w13": (341, 1536, 2048), "deepseek-w13": (34, 4096, 7168), "mixtral-w13": (8, 28672, 4096)}

WEIGHT_BYTES = {"none": 2, "fp8_tensor": 1, "fp8_channel": 1, "fp8_block": 1, "int8_w8a16": 1}


def roofline_s(shape: MoEShape, T: int, scheme: str, experts_touched: int, bandwidth: float, peak: float) -> dict:
    """Lower bound on time: max(bytes / bandwidth, flops / peak). Bytes: the touched experts' weights
    once, x read and out written once (bf16). Flops: 2 * T * k * (N1*H + H*I)."""
    wbytes = experts_touched * (shape.n1 * shape.H + shape.H * shape.I) * WEIGHT_BYTES[scheme]
    io_bytes = 2 * T * shape.H * 2
    flops = 2 * T * shape.k * (shape.n1 * shape.H + shape.H * shape.I)
    t_mem, t_flop = (wbytes + io_bytes) / bandwidth, flops / peak
    return {"bytes": wbytes + io_bytes, "flops": flops, "roof_s": max(t_mem, t_flop),
            "bound": "memory" if t_mem >= t_flop else "compute"}
