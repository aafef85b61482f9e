"""Reference quantization (docs/design.md §3): ``real ~= q * scale``, fp32 scales. The math of each format
lives on its registry object (``torch_moe_ops.schemes``); these are the name-taking entry points."""
from __future__ import annotations

import torch

from ..schemes import get_activation_quant, get_weight_format


def quantize_weight(w: torch.Tensor, scheme, block_shape=None, shards: int = 1):
    """w: [E, N, K] or [N, K] float -> (q, scale) of the format ``scheme`` (name or ``WeightFormat``):
    q [.., N, K / pack] in its storage dtype, scale fp32 ``fmt.scale_shape``."""
    fmt = get_weight_format(scheme)
    block = fmt.block_shape(block_shape)
    squeeze = w.dim() == 2
    q, scale = fmt.quantize(w[None] if squeeze else w, block, shards)
    return (q[0], scale[0]) if squeeze else (q, scale)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, scheme, block_shape=None) -> torch.Tensor:
    """Inverse of ``quantize_weight`` for [E, N, K / pack] storage: fp32 [E, N, K]."""
    fmt = get_weight_format(scheme)
    return fmt.dequantize(q, scale, fmt.block_shape(block_shape))


def quantize_activation(x: torch.Tensor, scheme, group_size: int = 128):
    """x: [T, K] -> (q [T, K] fp8 e4m3fn, scale fp32: fp8_token [T, 1], fp8_group [T, ceil(K/g)])."""
    return get_activation_quant(scheme).quantize(x, group_size)


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of ``quantize_activation``: fp32 [T, K]."""
    if scale.shape[1] == 1:
        return q.float() * scale
    return q.float() * scale.repeat_interleave(group_size, 1)[:, : q.shape[1]]


def fake_quantize_activation(x: torch.Tensor, scheme, group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize (identity when scheme is None): what the GEMM actually sees, fp32."""
    if scheme is None:
        return x.float()
    aq = get_activation_quant(scheme)
    q, s = aq.quantize(x, group_size)
    return aq.dequantize(q, s, group_size)
