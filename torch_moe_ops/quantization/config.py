"""Online-quantization configs for ``FusedMoE`` (spec §3). Frozen, hashable, free of global state.

Each config names two things: the ``fused_experts`` ``quant_scheme`` the layer runs with and the
``quantize_weight`` scheme its loader quantizes checkpoint weights with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._spec import DEFAULT_BLOCK_SHAPE, cdiv, weight_qdtype

_FP8_SCHEMES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class Fp8Config:
    """fp8 e4m3fn weights, quantized online at load time; activations quantized dynamically per token
    (per 1 x block_k group for ``scheme="block"``) inside the op.

    scheme: ``"tensor"`` (one scale per expert and projection; gate and up keep separate scales),
        ``"channel"`` (one per output row), or ``"block"`` (one per ``block_shape`` tile).
    block_shape: (block_n, block_k) tile of the block scheme (ignored by the others).
    """

    scheme: str = "tensor"
    block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE

    def __post_init__(self):
        if self.scheme not in _FP8_SCHEMES:
            raise ValueError(f"Fp8Config.scheme must be one of {_FP8_SCHEMES}, got {self.scheme!r}")
        shape = tuple(self.block_shape)
        if len(shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in shape):
            raise ValueError(f"Fp8Config.block_shape must be two positive ints, got {self.block_shape!r}")
        object.__setattr__(self, "block_shape", shape)

    @property
    def expert_scheme(self) -> str:
        """The ``fused_experts`` quant_scheme: ``fp8_tensor`` | ``fp8_channel`` | ``fp8_block``."""
        return f"fp8_{self.scheme}"

    @property
    def weight_scheme(self) -> str:
        """The ``quantize_weight`` scheme: ``fp8_tensor`` | ``fp8_channel`` | ``fp8_block``."""
        return f"fp8_{self.scheme}"

    @property
    def kernel_block_shape(self) -> list[int] | None:
        """``block_shape`` argument of the ops: ``[bn, bk]`` for the block scheme, else None."""
        return list(self.block_shape) if self.scheme == "block" else None


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights with one fp32 scale per output channel (w8a16); activations stay bf16/fp16."""

    @property
    def expert_scheme(self) -> str:
        return "int8_w8a16"

    @property
    def weight_scheme(self) -> str:
        return "int8_channel"

    @property
    def kernel_block_shape(self) -> None:
        return None


QuantConfig = Fp8Config | Int8WeightOnlyConfig


def check_quant_config(quant_config) -> QuantConfig | None:
    if quant_config is None or isinstance(quant_config, (Fp8Config, Int8WeightOnlyConfig)):
        return quant_config
    raise TypeError("quant_config must be None, torch_moe_ops.Fp8Config(...) or torch_moe_ops.Int8WeightOnlyConfig(), "
                    f"got {type(quant_config).__name__}")


def weight_dtype(quant_config: QuantConfig | None, params_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of ``w13_weight`` / ``w2_weight``."""
    return params_dtype if quant_config is None else weight_qdtype(quant_config.weight_scheme)


def scale_shape(quant_config: QuantConfig, E: int, N: int, K: int, shards: int) -> tuple[int, ...]:
    """Stored scale shape for an ``[E, N, K]`` weight: fp8_tensor ``[E, shards]`` (``[E]`` when shards is 0),
    channel ``[E, N]``, block ``[E, ceil(N/bn), ceil(K/bk)]``."""
    scheme = quant_config.weight_scheme
    if scheme == "fp8_tensor":
        return (E,) if shards == 0 else (E, shards)
    if scheme == "fp8_block":
        bn, bk = quant_config.block_shape
        return (E, cdiv(N, bn), cdiv(K, bk))
    return (E, N)
