"""Reference quantization (spec §3): ``real ~= q * scale``, scale = max(amax, eps) / QMAX, fp32 scales."""
from __future__ import annotations

import torch

from .._spec import DEFAULT_BLOCK_SHAPE, FP8_DTYPE, FP8_MAX, SCALE_EPS, cdiv, weight_qdtype, weight_qmax


def _to_q(x: torch.Tensor, scale: torch.Tensor, qmax: float, qdtype: torch.dtype) -> torch.Tensor:
    y = x.float() * (1.0 / scale)
    if qdtype == torch.int8:
        y = torch.round(y)
    return y.clamp(-qmax, qmax).to(qdtype)


def _blocks(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """[E, N, K] -> [E, nb, bn, kb, bk] fp32, zero padded to whole blocks."""
    E, N, K = w.shape
    nb, kb = cdiv(N, bn), cdiv(K, bk)
    padded = torch.zeros(E, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:, :N, :K] = w.float()
    return padded.view(E, nb, bn, kb, bk)


def weight_scale(w: torch.Tensor, scheme: str, block_shape=None, shards: int = 1) -> torch.Tensor:
    """w: [E, N, K] -> fp32 scale: fp8_tensor [E, shards], fp8_channel/int8_channel [E, N],
    fp8_block [E, ceil(N/bn), ceil(K/bk)]."""
    qmax = weight_qmax(scheme)
    E, N, K = w.shape
    if scheme == "fp8_tensor":
        amax = w.float().abs().reshape(E, shards, -1).amax(-1)
    elif scheme in ("fp8_channel", "int8_channel"):
        amax = w.float().abs().amax(-1)
    elif scheme == "fp8_block":
        bn, bk = block_shape or DEFAULT_BLOCK_SHAPE
        amax = _blocks(w, bn, bk).abs().amax(dim=(2, 4))
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}")
    return amax.clamp_min(SCALE_EPS) / qmax


def expand_weight_scale(scale: torch.Tensor, shape, scheme: str, block_shape=None) -> torch.Tensor:
    """Broadcast a weight scale to the full [E, N, K] weight shape (fp32)."""
    E, N, K = shape
    if scheme == "fp8_tensor":
        s = scale.reshape(E, -1)
        return s.repeat_interleave(N // s.shape[1], dim=1)[:, :, None].expand(E, N, K)
    if scheme in ("fp8_channel", "int8_channel"):
        return scale.reshape(E, N, 1).expand(E, N, K)
    bn, bk = block_shape or DEFAULT_BLOCK_SHAPE
    return scale.repeat_interleave(bn, 1).repeat_interleave(bk, 2)[:, :N, :K]


def quantize_weight(w: torch.Tensor, scheme: str, block_shape=None, shards: int = 1):
    """w: [E, N, K] or [N, K] float -> (q: same shape fp8 e4m3fn / int8, scale fp32; see ``weight_scale``)."""
    squeeze = w.dim() == 2
    w3 = w[None] if squeeze else w
    scale = weight_scale(w3, scheme, block_shape, shards)
    full = expand_weight_scale(scale, w3.shape, scheme, block_shape)
    q = _to_q(w3, full, weight_qmax(scheme), weight_qdtype(scheme))
    return (q[0], scale[0]) if squeeze else (q, scale)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, scheme: str, block_shape=None) -> torch.Tensor:
    """Inverse of ``quantize_weight`` for [E, N, K] weights: fp32."""
    return q.float() * expand_weight_scale(scale.float(), q.shape, scheme, block_shape)


def quantize_activation(x: torch.Tensor, scheme: str, group_size: int = 128):
    """x: [T, K] -> (q [T, K] fp8 e4m3fn, scale fp32: fp8_token [T, 1], fp8_group [T, ceil(K/g)])."""
    T, K = x.shape
    if scheme == "fp8_token":
        scale = x.float().abs().amax(-1, keepdim=True).clamp_min(SCALE_EPS) / FP8_MAX
        return _to_q(x, scale, FP8_MAX, FP8_DTYPE), scale
    if scheme != "fp8_group":
        raise ValueError(f"unknown activation scheme {scheme!r}")
    groups = cdiv(K, group_size)
    padded = torch.zeros(T, groups * group_size, dtype=torch.float32, device=x.device)
    padded[:, :K] = x.float()
    scale = padded.view(T, groups, group_size).abs().amax(-1).clamp_min(SCALE_EPS) / FP8_MAX
    full = scale.repeat_interleave(group_size, 1)[:, :K]
    return _to_q(x, full, FP8_MAX, FP8_DTYPE), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Inverse of ``quantize_activation``: fp32 [T, K]."""
    if scale.shape[1] == 1:
        return q.float() * scale
    return q.float() * scale.repeat_interleave(group_size, 1)[:, : q.shape[1]]


def fake_quantize_activation(x: torch.Tensor, scheme: str | None, group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize (identity when scheme is None): what the GEMM actually sees, fp32."""
    if scheme is None:
        return x.float()
    q, s = quantize_activation(x, scheme, group_size)
    return dequantize_activation(q, s, group_size)
