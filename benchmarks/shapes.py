"""Benchmark shapes and the per-cell roofline (weight bytes asked of the scheme registry)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from torch_moe_ops.schemes import QUANT_SCHEMES, get_activation, get_quant_scheme


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
        return get_activation(self.activation).n1(self.I)


ALL_SCHEMES = tuple(QUANT_SCHEMES)  #: every scheme of the registry, in its order
SHAPES = {
    "qwen3-30b-a3b": MoEShape("Qwen3-30B-A3B", 128, 8, 2048, 768, schemes=ALL_SCHEMES),
    "mixtral-8x7b": MoEShape("Mixtral-8x7B", 8, 2, 4096, 14336, schemes=ALL_SCHEMES),
    "gpt-oss-20b": MoEShape("GPT-OSS-20B", 32, 4, 2880, 2880, activation="swigluoai", bias=True,
                            schemes=ALL_SCHEMES),
    "deepseek-v3": MoEShape("DeepSeek-V3", 256, 8, 7168, 2048, schemes=ALL_SCHEMES,
                            routing=dict(num_expert_group=8, topk_group=4, scoring_func="sigmoid")),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

#: ~1 G-element bf16 w13 tensors [E, 2 * I, H] for online quantization: one (expert, shard) slice is
#: 3 MB (Qwen3), 29 MB (DeepSeek-V3) and 117 MB (Mixtral) of bf16 -- below, near and above the H100's 50 MB L2.
QUANT_SHAPES = {"qwen3-w13": (341, 1536, 2048), "deepseek-w13": (34, 4096, 7168), "mixtral-w13": (8, 28672, 4096)}


#: A timed call rotates through copies of the weights until it touches this many bytes of them, so that each
#: replay reads its weights from HBM as in a model, not from the 50 MB (H100) / 60 MB (H200) L2.
L2_DEFEAT_BYTES = 200e6


def weight_copies(touched_bytes: float, full_bytes: float, max_bytes: float) -> int:
    """How many weight sets a timed call rotates through (1 = the original only): enough that they touch
    ``L2_DEFEAT_BYTES`` together, within ``max_bytes`` of memory for all of them (``full_bytes`` each)."""
    want = -(-L2_DEFEAT_BYTES // max(touched_bytes, 1))
    return int(max(1, min(want, max_bytes // max(full_bytes, 1))))


def expert_bytes(shape: MoEShape, scheme: str, block=None) -> int:
    """Bytes of one expert's w13 and w2 in ``scheme``: bf16 for ``none``, else the format's packed storage
    (int4 / mxfp4: half a byte per weight) plus its scales (fp32; mxfp4: one E8M0 byte per 32 weights)."""
    qs = get_quant_scheme(scheme)
    fmt, block = qs.weight, qs.block_shape(block)  # None -> the scheme's default tile (if it has one)
    total = 0
    for N, K in ((shape.n1, shape.H), (shape.H, shape.I)):
        if fmt is None:
            total += N * K * 2
            continue
        packed, scales = fmt.packed_shape((1, N, K)), fmt.scale_shape((1, N, K), block)
        scale_dtype = getattr(fmt, "scale_dtype", torch.float32)  # (a base tree of gpu_kernels.sh may predate it)
        total += math.prod(packed) * fmt.qdtype.itemsize + math.prod(scales) * scale_dtype.itemsize
    return total


def roofline_s(shape: MoEShape, T: int, scheme: str, experts_touched: int, bandwidth: float, peak: float,
               block=None) -> dict:
    """Lower bound on time: max(bytes / bandwidth, flops / peak). Bytes: the touched experts' weights (and
    scales) once, x read and out written once (bf16). Flops: 2 * T * k * (N1*H + H*I)."""
    wbytes = experts_touched * expert_bytes(shape, scheme, block)
    io_bytes = 2 * T * shape.H * 2
    flops = 2 * T * shape.k * (shape.n1 * shape.H + shape.H * shape.I)
    t_mem, t_flop = (wbytes + io_bytes) / bandwidth, flops / peak
    return {"bytes": wbytes + io_bytes, "flops": flops, "roof_s": max(t_mem, t_flop),
            "bound": "memory" if t_mem >= t_flop else "compute"}
