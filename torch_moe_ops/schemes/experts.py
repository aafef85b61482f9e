"""Expert quantization schemes (docs/design.md §3): the ``quant_scheme`` of ``fused_experts``.

A ``QuantScheme`` pairs a weight format (``None``: full precision) with an activation quantization
(``None``: activations stay in the compute dtype), and names the grouped GEMM's feature flags
(``GemmFlags``, passed to the Triton kernel as constexprs) and its tile-table key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._lookup import lookup
from .numerics import FP8_DTYPE, FP8_MAX, SCALE_EPS, cdiv
from .weights import (FP8_BLOCK, FP8_CHANNEL, FP8_TENSOR, INT4_GROUP, INT8_CHANNEL, MXFP4, WEIGHT_FORMAT_ALIASES,
                      WeightFormat)


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True, eq=False)
class ActivationQuant:
    """Dynamic fp8 quantization of a GEMM input ``[T, K]``; each row is independent of the others.

    grouped: one scale per ``1 x group`` group (``[T, ceil(K / group)]``) instead of per row (``[T, 1]``)."""

    name: str
    grouped: bool

    def scale_cols(self, K: int, group: int) -> int:
        return cdiv(K, group) if self.grouped else 1

    def quantize(self, x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: x [T, K] -> (q [T, K] fp8 e4m3fn, scale fp32 [T, scale_cols])."""
        T, K = x.shape
        g = group if self.grouped else max(K, 1)
        cols = cdiv(K, g)
        padded = torch.zeros(T, cols * g, dtype=torch.float32, device=x.device)
        padded[:, :K] = x.float()
        scale = padded.view(T, cols, g).abs().amax(-1).clamp_min(SCALE_EPS) / FP8_MAX
        if K == 0:
            scale = scale.new_full((T, 1), SCALE_EPS / FP8_MAX)
        full = scale.repeat_interleave(g, 1)[:, :K]
        return (x.float() * (1.0 / full)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
        if scale.shape[1] == 1:
            return q.float() * scale
        return q.float() * scale.repeat_interleave(group, 1)[:, : q.shape[1]]

    def __repr__(self) -> str:
        return f"ActivationQuant({self.name!r})"


FP8_TOKEN = ActivationQuant("fp8_token", grouped=False)
FP8_GROUP = ActivationQuant("fp8_group", grouped=True)
ACTIVATION_QUANTS: dict[str, ActivationQuant] = {a.name: a for a in (FP8_TOKEN, FP8_GROUP)}


def get_activation_quant(name) -> ActivationQuant:
    return lookup(ACTIVATION_QUANTS, name, ActivationQuant, "scheme")


# ------------------------------------------------------------------------------------------ GEMM flags
@dataclass(frozen=True)
class GemmFlags:
    """The grouped GEMM's scheme constexprs (``_kernels/gemm.py``); every field is a kernel argument."""

    A_ROW_SCALE: bool = False  #: fp8 activations with one scale per row, applied in the epilogue
    W_TENSOR_SCALE: bool = False  #: one weight scale per expert (or per gate/up half), epilogue
    W_CHANNEL_SCALE: bool = False  #: one weight scale per output column, epilogue
    BLOCK_SCALES: bool = False  #: fp8 [1, gk] activation x [gn, gk] weight scales inside the K loop
    W_GROUP_SCALE: bool = False  #: weight scales per [1, gk] group along K, inside the K loop
    W_CAST: bool = False  #: integer weights cast to the activation dtype in registers

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ schemes
@dataclass(frozen=True, eq=False)
class QuantScheme:
    """One ``fused_experts`` quant scheme.

    weight: the weight format (None: weights in the activation dtype). act: the activation quantization
    before each GEMM (None: none). flags: the GEMM's constexprs. fp8_dot: both GEMM operands are fp8
    (Triton then needs BLOCK_K >= 32)."""

    name: str
    weight: WeightFormat | None
    act: ActivationQuant | None
    flags: GemmFlags

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    @property
    def fp8_dot(self) -> bool:
        return self.act is not None

    @property
    def packed(self) -> bool:
        """Several weight values per storage byte along K (int4: two)."""
        return self.weight is not None and self.weight.pack > 1

    def kernel_kwargs(self) -> dict:
        """The GEMMs' scheme constexprs: the flags, ``W_PACKED`` and the weight codec's name ``W_CODEC``
        (``_kernels/formats.py`` decodes storage by it; ``"none"``: weights in the activation dtype)."""
        return {**self.flags.kwargs(), "W_PACKED": self.packed, "W_CODEC": self.codec}

    @property
    def codec(self) -> str:
        """The weight codec's name in the kernels (``W_CODEC``); ``"none"``: weights in the activation dtype."""
        return self.weight.codec.kernel if self.weight is not None else "none"

    @property
    def tiled(self) -> bool:
        """Scales per tile along K: BLOCK_K must divide the tile's K size."""
        return self.flags.BLOCK_SCALES or self.flags.W_GROUP_SCALE

    def block_shape(self, block_shape, name: str = "block_shape") -> tuple[int, int] | None:
        """Canonical scale tile (``None`` for schemes without one); raises for a misplaced tile."""
        if self.weight is None:
            if block_shape is not None:
                raise ValueError(f"{name} is only used by the fp8_block and int4_w4a16 schemes, got "
                                 f"{list(block_shape)} with {self.name!r}")
            return None
        return self.weight.block_shape(block_shape, name)

    def weight_dtypes(self, x_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return (x_dtype,) if self.weight is None else (self.weight.qdtype,)

    def act_group(self, block) -> int:
        """Group size of grouped activation quantization (the weight tile's K)."""
        return block[1] if block is not None else 128

    def table_key(self, block) -> str:
        """Key of the tuned tile tables: the name, plus the scale tile when the scheme has one."""
        if self.tiled:
            return f"{self.name}_{block[0]}x{block[1]}"
        return self.name

    def weight_scale_shapes(self, E: int, N: int, K: int, block, *, gate_up: bool) -> list[tuple[int, ...]]:
        """Accepted scale shapes of a ``[E, N, K]`` weight (K logical); the first is canonical.
        ``gate_up``: a w13 with gate and up halves (per-tensor may then carry one scale per half)."""
        fmt = self.weight
        if self.flags.W_TENSOR_SCALE:
            return [(E, 2), (E, 1), (E,)] if gate_up else [(E, 1), (E,)]
        if self.flags.W_CHANNEL_SCALE:
            return [(E, N), (E, N, 1)]
        return [fmt.scale_shape((E, N, K), block)]

    def canonical_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The kernels' view: ``[E, -1]`` for per-tensor / per-channel, the tile shape otherwise."""
        return scale if self.tiled else scale.reshape(scale.shape[0], -1)

    def __repr__(self) -> str:
        return f"QuantScheme({self.name!r})"


NONE = QuantScheme("none", None, None, GemmFlags())
QUANT_SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (
    NONE,
    QuantScheme("fp8_tensor", FP8_TENSOR, FP8_TOKEN, GemmFlags(A_ROW_SCALE=True, W_TENSOR_SCALE=True)),
    QuantScheme("fp8_channel", FP8_CHANNEL, FP8_TOKEN, GemmFlags(A_ROW_SCALE=True, W_CHANNEL_SCALE=True)),
    QuantScheme("fp8_block", FP8_BLOCK, FP8_GROUP, GemmFlags(BLOCK_SCALES=True)),
    QuantScheme("int8_w8a16", INT8_CHANNEL, None, GemmFlags(W_CHANNEL_SCALE=True, W_CAST=True)),
    QuantScheme("int4_w4a16", INT4_GROUP, None, GemmFlags(W_GROUP_SCALE=True, W_CAST=True)),
    # OCP MX fp4 weights (E2M1 + E8M0 scales per 32 along K), bf16 / fp16 activations: dequantized in the GEMM
    QuantScheme("mxfp4", MXFP4, None, GemmFlags(W_GROUP_SCALE=True, W_CAST=True)),
)}


#: One name per scheme works everywhere: the weight format's name (``quantize_weight``'s) and the short name
#: resolve to the scheme too, so ``"int4_w4a16"`` / ``"int4_group"`` / ``"int4"`` are one scheme.
_SHORT_NAMES = {"int8": "int8_w8a16", "int4": "int4_w4a16"}
QUANT_SCHEME_ALIASES: dict[str, str] = dict(_SHORT_NAMES)
for _s in QUANT_SCHEMES.values():
    if _s.quantized and _s.weight.name != _s.name:  # e.g. int4_w4a16 uses int4_group: each name means both
        QUANT_SCHEME_ALIASES[_s.weight.name] = _s.name
        WEIGHT_FORMAT_ALIASES[_s.name] = _s.weight.name
WEIGHT_FORMAT_ALIASES.update({short: QUANT_SCHEMES[name].weight.name for short, name in _SHORT_NAMES.items()})


def get_quant_scheme(name) -> QuantScheme:
    """A scheme name, alias, ``WeightFormat`` (its scheme) or ``QuantScheme`` -> the ``QuantScheme``."""
    if isinstance(name, WeightFormat):
        return next(s for s in QUANT_SCHEMES.values() if s.weight is name)
    return lookup(QUANT_SCHEMES, name, QuantScheme, "quant_scheme", QUANT_SCHEME_ALIASES)
