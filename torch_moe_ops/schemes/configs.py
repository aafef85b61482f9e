"""Online-quantization configs for ``FusedMoE`` (docs/design.md §3, §10): frozen, hashable, one-liners that
point at a ``QuantScheme`` of this registry and carry its scale tile. Public as
``torch_moe_ops.Fp8Config`` / ``torch_moe_ops.quantization.Fp8Config`` (``quantization/`` re-exports them).

The layer asks the config's ``quant_scheme`` for everything else (storage dtype, packed shape, scale shapes,
the TP rule); no code outside the registry decodes a scheme name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import QuantScheme, get_quant_scheme

_FP8_GRANULARITIES = ("tensor", "channel", "block")


class QuantConfig:
    """Base of the configs: ``quant_scheme`` (a ``QuantScheme``) and ``block`` (its scale tile or None)."""

    block: tuple[int, int] | None = None

    @property
    def quant_scheme(self) -> QuantScheme:
        raise NotImplementedError

    # names kept for callers of the first release
    @property
    def expert_scheme(self) -> str:
        """The ``fused_experts`` quant_scheme string."""
        return self.quant_scheme.name

    @property
    def weight_scheme(self) -> str:
        """The ``quantize_weight`` scheme string."""
        return self.quant_scheme.weight.name

    @property
    def kernel_block_shape(self) -> list[int] | None:
        """``block_shape`` argument of the ops: the scale tile for tiled schemes, else None."""
        return list(self.block) if self.block is not None else None

    def weight_dtype(self) -> torch.dtype:
        return self.quant_scheme.weight.qdtype

    def storage_shape(self, E: int, N: int, K: int) -> tuple[int, ...]:
        """Storage of an ``[E, N, K]`` weight (int4: ``[E, N, K // 2]``)."""
        return self.quant_scheme.weight.packed_shape((E, N, K))

    def scale_shape(self, E: int, N: int, K: int, shards: int) -> tuple[int, ...]:
        """Stored scale shape for an ``[E, N, K]`` weight; per-tensor: ``[E, shards]`` (``[E]`` when shards is 0)."""
        fmt = self.quant_scheme.weight
        if shards == 0:
            shape = fmt.scale_shape((E, N, K), self.block, 1)
            return shape[:1] if fmt.sharded else shape
        return fmt.scale_shape((E, N, K), self.block, shards)

    def check_dims(self, where: str, **dims: int) -> None:
        """Every GEMM K dim (hidden_size, intermediate_size) must suit the format (int4: divisible by G)."""
        fmt = self.quant_scheme.weight
        for name, K in dims.items():
            try:
                fmt.check_shape((1, K), self.block, 1, name)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None

    def tp_shard_error(self, intermediate: int) -> str | None:
        return self.quant_scheme.weight.tp_shard_error(intermediate, self.block)


@dataclass(frozen=True)
class Fp8Config(QuantConfig):
    """fp8 e4m3fn weights, quantized online at load time; activations quantized dynamically per token
    (per 1 x block_k group for ``scheme="block"``) inside the op.

    scheme: ``"tensor"`` (one scale per expert and projection; gate and up keep separate scales),
        ``"channel"`` (one per output row), or ``"block"`` (one per ``block_shape`` tile).
    block_shape: (block_n, block_k) tile of the block scheme (ignored by the others).
    """

    scheme: str = "tensor"
    block_shape: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.scheme not in _FP8_GRANULARITIES:
            raise ValueError(f"Fp8Config.scheme must be one of {_FP8_GRANULARITIES}, got {self.scheme!r}")
        shape = tuple(self.block_shape)
        if len(shape) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in shape):
            raise ValueError(f"Fp8Config.block_shape must be two positive ints, got {self.block_shape!r}")
        object.__setattr__(self, "block_shape", shape)
        object.__setattr__(self, "block", shape if self.quant_scheme.tiled else None)

    @property
    def quant_scheme(self) -> QuantScheme:
        return get_quant_scheme(f"fp8_{self.scheme}")


@dataclass(frozen=True)
class Int8Config(QuantConfig):
    """int8 weights with one fp32 scale per output channel (w8a16); activations stay bf16/fp16."""

    @property
    def quant_scheme(self) -> QuantScheme:
        return get_quant_scheme("int8_w8a16")


#: The first release's name of ``Int8Config``.
Int8WeightOnlyConfig = Int8Config


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    """int4 weights (two per byte) with one fp32 scale per 1 x ``group_size`` group along K (w4a16);
    activations stay bf16/fp16. ``group_size`` in {32, 64, 128}; H and I must be divisible by it."""

    group_size: int = 128

    def __post_init__(self):
        block = self.quant_scheme.weight.block_shape((1, self.group_size), "Int4Config.group_size as [1, G]")
        object.__setattr__(self, "block", block)

    @property
    def quant_scheme(self) -> QuantScheme:
        return get_quant_scheme("int4_w4a16")


@dataclass(frozen=True)
class Mxfp4Config(QuantConfig):
    """OCP MX fp4 weights: E2M1 values two per byte with one E8M0 scale byte per 32 along K (GPT-OSS's
    format); activations stay bf16/fp16, the GEMM dequantizes. H and I must be multiples of 32."""

    block = (1, 32)

    @property
    def quant_scheme(self) -> QuantScheme:
        return get_quant_scheme("mxfp4")


#: The config a scheme name stands for (each scheme's default tile); ``check_quant_config`` reads it.
DEFAULT_CONFIGS: dict[QuantScheme, QuantConfig] = {c.quant_scheme: c for c in (
    Fp8Config("tensor"), Fp8Config("channel"), Fp8Config("block"), Int8Config(), Int4Config(), Mxfp4Config())}


def check_quant_config(quant_config, what: str = "quant_config") -> QuantConfig | None:
    """None, a config, or a scheme name (``"fp8_block"`` -> ``Fp8Config("block")``, ``"int4"`` ->
    ``Int4Config(128)``, ``"none"`` -> None) -> the config; anything else raises naming ``what``."""
    if quant_config is None or isinstance(quant_config, QuantConfig):
        return quant_config
    names = ", ".join(repr(n) for n in ("none", *(s.name for s in DEFAULT_CONFIGS)))
    if isinstance(quant_config, (str, QuantScheme)):
        try:
            scheme = get_quant_scheme(quant_config)
        except ValueError:
            hint = " (fp8 needs a granularity: 'fp8_tensor', 'fp8_channel' or 'fp8_block')" \
                if quant_config == "fp8" else ""
            raise ValueError(f"{what}={quant_config!r} is not a scheme name{hint}; use a config "
                             f"(torch_moe_ops.Fp8Config(...), Int8Config(), Int4Config(...), Mxfp4Config()) or one of "
                             f"{names}") from None
        return DEFAULT_CONFIGS.get(scheme)
    raise TypeError(f"{what} must be None, a scheme name ({names}) or torch_moe_ops.Fp8Config(...), Int8Config(), "
                    f"Int4Config(...) or Mxfp4Config(), got {type(quant_config).__name__}")
