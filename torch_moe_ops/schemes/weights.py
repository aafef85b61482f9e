"""Weight formats (docs/design.md §3): what ``quantize_weight`` writes, as objects.

A format = an element codec (fp8 e4m3fn, int8, packed int4) x a scale granularity (per tensor shard,
per output channel, per [bn, bk] block, per [1, G] group along K). It knows its storage dtype and
packed shape, its scale shape for ``[E, N, K]``, its reference quantize/dequantize (pure PyTorch,
fp32) and its tensor-parallel divisibility rule. ``get_weight_format(name)`` resolves names once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._lookup import lookup
from .numerics import (E8M0_BIAS, FP4_E2M1_VALUES, FP4_MAX, FP8_DTYPE, FP8_MAX, INT4_MAX, INT4_MIN, INT8_MAX, SCALE_EPS,
                       cdiv)


# ------------------------------------------------------------------------------------------ element codecs
class _Codec:
    """Maps fp32 values already divided by their scale to storage, and back."""

    dtype: torch.dtype  #: storage dtype
    qmax: float  #: scale divisor: ``scale = amax / qmax``
    pack: int = 1  #: values per storage element along K
    #: the codec's name in the Triton kernels (``W_CODEC``): ``_kernels/formats.py`` decodes storage by it
    kernel: str = ""
    #: how scales are stored (fp32 unless the codec fixes its own scale encoding) and the stored "1.0"
    scale_dtype: torch.dtype = torch.float32
    scale_one: float = 1.0
    #: pre-quantized checkpoints: the weight dtype they store this codec in (None: not read) and their scales'
    checkpoint_dtype: torch.dtype | None = None
    checkpoint_scale_dtypes: tuple[torch.dtype, ...] = ()

    def scale(self, amax: torch.Tensor) -> torch.Tensor:
        return amax.clamp_min(SCALE_EPS) / self.qmax

    def inverse(self, scale: torch.Tensor) -> torch.Tensor:
        return 1.0 / scale

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return q.float()

    def store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """fp32 scales -> their stored form (``scale_dtype``)."""
        return scale

    def load_scale(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales -> fp32."""
        return stored.float()


class _Fp8(_Codec):
    dtype, qmax, kernel = FP8_DTYPE, FP8_MAX, "fp8"
    checkpoint_dtype, checkpoint_scale_dtypes = FP8_DTYPE, (torch.float32, torch.bfloat16)

    def encode(self, y):
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class _Int8(_Codec):
    dtype, qmax, kernel = torch.int8, INT8_MAX, "int8"

    def encode(self, y):
        return torch.round(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


class _Int4(_Codec):
    """Two's-complement nibbles, two per uint8 along K: element 2j low, 2j + 1 high. No scale floor:
    an all-zero group gets scale 0 and q = 0 (its inverse is taken as 0, never inf)."""

    dtype, qmax, pack, kernel = torch.uint8, INT4_MAX, 2, "int4"

    def scale(self, amax):
        return amax / INT4_MAX

    def inverse(self, scale):
        return torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))

    def encode(self, y):
        q = torch.round(y).clamp(INT4_MIN, INT4_MAX).to(torch.int16) & 0xF
        return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)

    def decode(self, q):
        nib = torch.stack([q & 0xF, q >> 4], -1).flatten(-2).to(torch.int16)
        return ((nib ^ 8) - 8).float()


class _Mxfp4(_Codec):
    """OCP MX fp4 as GPT-OSS stores it: E2M1 codes two per uint8 along K (element 2j low nibble, bit 3 the sign),
    one E8M0 scale byte ``s`` (value ``2^(s - 127)``, 255 = NaN) per 32 values along K.

    Quantization (OCP MX v1.0): the group's scale is ``2^(floor(log2(amax)) - 2)`` (2 = E2M1's largest
    exponent), so ``amax / scale`` lies in [4, 8); each value / scale rounds to the nearest E2M1 value, ties to
    the even code, saturating at ±6. An all-zero group gets ``2^-127`` (byte 0); a NaN group byte 255; an
    infinite amax the largest scale ``2^127`` (its values saturate)."""

    dtype, qmax, pack, kernel = torch.uint8, FP4_MAX, 2, "fp4_e2m1"
    scale_dtype, scale_one = torch.uint8, float(E8M0_BIAS)
    checkpoint_dtype, checkpoint_scale_dtypes = torch.uint8, (torch.uint8,)  # GPT-OSS: packed bytes, E8M0 bytes
    _MIDPOINTS = tuple((a + b) / 2 for a, b in zip(FP4_E2M1_VALUES, FP4_E2M1_VALUES[1:]))

    def scale(self, amax):
        _, ex = torch.frexp(amax)  # amax = m · 2^ex, m in [0.5, 1): floor(log2(amax)) = ex - 1
        e = torch.where(amax > 0, ex - 3, torch.full_like(ex, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
        e = torch.where(torch.isinf(amax), torch.full_like(e, E8M0_BIAS), e)
        s = torch.ldexp(torch.ones_like(amax), e)
        return torch.where(torch.isnan(amax), torch.full_like(s, float("nan")), s)

    def encode(self, y):
        mag = y.abs()
        mids = torch.tensor(self._MIDPOINTS, dtype=mag.dtype, device=mag.device)
        # the number of midpoints below |y|: the nearest value, ties down (bucketize: O(n) memory, not [..., 7])
        code = torch.bucketize(mag, mids, out_int32=True)
        tie = (code < len(mids)) & (mag == mids[code.clamp(max=len(mids) - 1)])
        code = code + (tie & (code % 2 == 1)).int()  # ties to the even code (its mantissa bit is 0)
        code = torch.where(torch.isnan(y), torch.zeros_like(code), code) | (torch.signbit(y).int() << 3)
        return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)

    def decode(self, q):
        lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=q.device)
        nib = torch.stack([q & 0xF, q >> 4], -1).flatten(-2).long()
        return torch.where(nib >= 8, -lut[nib & 7], lut[nib & 7])

    def store_scale(self, scale):
        _, ex = torch.frexp(scale)  # scale = 0.5 · 2^ex exactly (a power of two)
        byte = torch.where(scale > 0, ex - 1 + E8M0_BIAS, torch.zeros_like(ex)).clamp(0, 254)
        return torch.where(torch.isnan(scale), torch.full_like(byte, 255), byte).to(torch.uint8)

    def load_scale(self, stored):
        s = torch.ldexp(torch.ones(stored.shape, device=stored.device), stored.to(torch.int32) - E8M0_BIAS)
        return torch.where(stored == 255, torch.full_like(s, float("nan")), s)


# ------------------------------------------------------------------------------------------ formats
@dataclass(frozen=True, eq=False)
class WeightFormat:
    """Base of the formats; subclasses fix the scale granularity.

    name: the ``quantize_weight`` scheme string. default_block: the scale tile ``(bn, bk)`` used when
    the caller passes ``block_shape=None`` (block and group formats only)."""

    name: str
    codec: _Codec
    default_block: tuple[int, int] | None = None
    #: which single-pass quantizer family of ``_kernels/quant.py`` serves this granularity (set per subclass)
    quantizer = ""
    #: fp8 storage may also be handed in as a ``uint8`` view (same bytes).
    alt_storage: tuple[torch.dtype, ...] = ()

    @property
    def qdtype(self) -> torch.dtype:
        return self.codec.dtype

    @property
    def qmax(self) -> float:
        return self.codec.qmax

    @property
    def pack(self) -> int:
        return self.codec.pack

    @property
    def scale_dtype(self) -> torch.dtype:
        """Stored scales: fp32, or the codec's own encoding (mxfp4: E8M0 bytes)."""
        return self.codec.scale_dtype

    @property
    def storage_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.qdtype,) + self.alt_storage

    @property
    def sharded(self) -> bool:
        """True when ``shards > 1`` is meaningful (one scale per row shard: per-tensor only)."""
        return False

    # -- shapes ----------------------------------------------------------------------------------
    def block_shape(self, block_shape, name: str = "block_shape") -> tuple[int, int] | None:
        """Canonical scale tile for this format; raises for a tile the format does not use."""
        if block_shape is not None:
            raise ValueError(f"{name} is only used by the fp8_block and int4_group schemes, "
                             f"got {list(block_shape)} with {self.name!r}")
        return None

    def packed_shape(self, shape) -> tuple[int, ...]:
        """Storage shape of a ``[..., N, K]`` weight (int4: ``[..., N, K // 2]``)."""
        *lead, N, K = shape
        return (*lead, N, K // self.pack)

    def logical_k(self, stored_k: int) -> int:
        return stored_k * self.pack

    def scale_shape(self, shape, block, shards: int = 1) -> tuple[int, ...]:
        raise NotImplementedError

    def check_shape(self, shape, block, shards: int, name: str = "w") -> None:
        """Shape rules beyond the scale shape (e.g. K divisible by the group); raises ValueError."""
        N = shape[-2]
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if shards > 1 and not self.sharded:
            raise ValueError(f"shards > 1 is only meaningful for fp8_tensor, got {shards} with {self.name!r}")
        if N % shards:
            raise ValueError(f"shards ({shards}) must divide {name}'s row count ({N})")

    def tp_shard_error(self, intermediate: int, block) -> str | None:
        """Why a TP shard of I rows per rank cannot hold this format (None when it can)."""
        return None

    # -- reference math (fp32) --------------------------------------------------------------------
    def amax(self, w: torch.Tensor, block, shards: int) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, scale: torch.Tensor, shape, block) -> torch.Tensor:
        """Broadcast a scale to the logical ``[E, N, K]`` weight shape (fp32)."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, block=None, shards: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """w: [E, N, K] float -> (q [E, N, K / pack] storage dtype, scale ``scale_shape`` in ``scale_dtype``)."""
        scale = self.codec.scale(self.amax(w.float(), block, shards))
        inv = self.expand(self.codec.inverse(scale), w.shape, block)
        return self.codec.encode(w.float() * inv), self.codec.store_scale(scale)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, block=None) -> torch.Tensor:
        """Inverse of ``quantize``: q [E, N, K / pack] -> fp32 [E, N, K]."""
        values = self.codec.decode(q)
        return values * self.expand(self.codec.load_scale(scale), values.shape, block)

    def __repr__(self) -> str:
        return f"WeightFormat({self.name!r})"


class _PerTensor(WeightFormat):
    """One scale per (expert, row shard): ``[E, shards]``; w13 uses shards=2 (gate, up halves)."""

    quantizer = "tensor"

    @property
    def sharded(self):
        return True

    def scale_shape(self, shape, block, shards=1):
        return (*shape[:-2], shards)

    def amax(self, w, block, shards):
        return w.abs().reshape(w.shape[0], shards, -1).amax(-1)

    def expand(self, scale, shape, block):
        E, N, K = shape
        s = scale.reshape(E, -1)
        return s.repeat_interleave(N // s.shape[1], dim=1)[:, :, None].expand(E, N, K)


class _PerChannel(WeightFormat):
    """One scale per output row: ``[E, N]``."""

    quantizer = "rows"

    def scale_shape(self, shape, block, shards=1):
        return tuple(shape[:-1])

    def amax(self, w, block, shards):
        return w.abs().amax(-1)

    def expand(self, scale, shape, block):
        E, N, K = shape
        return scale.reshape(E, N, 1).expand(E, N, K)


class _Tiled(WeightFormat):
    """One scale per ``[bn, bk]`` tile of each expert: ``[E, ceil(N / bn), ceil(K / bk)]``. Partial tiles
    at the edges are allowed unless ``exact_k`` (the int4 groups, which must tile K exactly)."""

    exact_k = False
    quantizer = "blocks"

    def block_shape(self, block_shape, name="block_shape"):
        block = tuple(block_shape) if block_shape is not None else self.default_block
        if len(block) != 2 or not all(isinstance(b, int) and b >= 1 for b in block):
            raise ValueError(f"{name} must be two positive ints [block_n, block_k], got {list(block)}")
        return block

    def scale_shape(self, shape, block, shards=1):
        *lead, N, K = shape
        return (*lead, cdiv(N, block[0]), cdiv(K, block[1]))

    def check_shape(self, shape, block, shards, name="w"):
        super().check_shape(shape, block, shards, name)
        if self.exact_k and shape[-1] % block[1]:
            raise ValueError(f"{self.name}: {name}'s K = {shape[-1]} is not divisible by the group size {block[1]}")

    def tp_shard_error(self, intermediate, block):
        bn, bk = block
        if intermediate % bk or (bn > 1 and intermediate % bn):
            return (f"{self.name} needs the TP shard I/tp = {intermediate} to be a multiple of its scale tile "
                    f"{block} so that shard boundaries fall on tile boundaries")
        return None

    def amax(self, w, block, shards):
        bn, bk = block
        E, N, K = w.shape
        nb, kb = cdiv(N, bn), cdiv(K, bk)
        padded = torch.zeros(E, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
        padded[:, :N, :K] = w
        return padded.view(E, nb, bn, kb, bk).abs().amax(dim=(2, 4))

    def expand(self, scale, shape, block):
        E, N, K = shape
        bn, bk = block
        return scale.repeat_interleave(bn, 1).repeat_interleave(bk, 2)[:, :N, :K]


class _Group(_Tiled):
    """int4 groups: ``block = (1, G)``, G in {32, 64, 128}, K divisible by G."""

    exact_k = True
    quantizer = "groups"
    GROUPS = (32, 64, 128)

    def block_shape(self, block_shape, name="block_shape"):
        block = super().block_shape(block_shape, name)
        if block[0] != 1 or block[1] not in self.GROUPS:
            raise ValueError(f"{name} for {self.name} is [1, G] with G in {self.GROUPS}, got {list(block)}")
        return block


class _Mx(_Group):
    """OCP MX groups: 32 values along K share one scale, always."""

    GROUPS = (32,)


FP8_TENSOR = _PerTensor("fp8_tensor", _Fp8(), alt_storage=(torch.uint8,))
FP8_CHANNEL = _PerChannel("fp8_channel", _Fp8(), alt_storage=(torch.uint8,))
FP8_BLOCK = _Tiled("fp8_block", _Fp8(), default_block=(128, 128), alt_storage=(torch.uint8,))
INT8_CHANNEL = _PerChannel("int8_channel", _Int8())
INT4_GROUP = _Group("int4_group", _Int4(), default_block=(1, 128))
MXFP4 = _Mx("mxfp4", _Mxfp4(), default_block=(1, 32))

WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK, INT8_CHANNEL,
                                                               INT4_GROUP, MXFP4)}


#: ``fused_experts``' scheme names (and the short ones) name their weight format too: one name per scheme.
#: Filled by ``experts.py`` from the schemes (the one place that knows which format each scheme uses).
WEIGHT_FORMAT_ALIASES: dict[str, str] = {}


def get_weight_format(name) -> WeightFormat:
    """A format name, alias, ``QuantScheme`` (its weight format) or ``WeightFormat`` -> the ``WeightFormat``."""
    if isinstance(getattr(name, "weight", None), WeightFormat):  # a QuantScheme
        return name.weight
    return lookup(WEIGHT_FORMATS, name, WeightFormat, "scheme", WEIGHT_FORMAT_ALIASES)
