"""Which pre-quantized format a checkpoint's routed experts are in (docs/design.md §11, docs/transformers.md):
the one place that decides "fp8 block / channel / tensor with these scales", from names and headers alone
(no data is read).

- float weights (bf16 / fp16 / fp32, and float8_e5m2, which the layer refuses by name): not pre-quantized;
  weights of a non-float dtype are refused here; GPT-OSS's MXFP4 (``*_blocks`` with their ``*_scales``) is
  ``Mxfp4Config()`` (``detect_prequantized``, the decision ``from_pretrained`` builds its layers with);
- float8_e4m3fn weights (every expert weight of the block, per-expert tensors only) with ``weight_scale_inv``
  siblings (DeepSeek-V3): block scales, of the block the checkpoint's ``quantization_config.weight_block_size``
  names (default 128 x 128); with ``weight_scale``: one value per weight is per tensor, one per weight row
  per channel.

``from_pretrained`` builds each block's ``FusedMoE`` with the config this returns (``Fp8Format.config``);
``load_checkpoint``, whose layers the caller built, names the format when a layer refuses the checkpoint's
fp8 pieces. The per-piece rules (scale shapes, dtypes, which layer takes what) are the layer's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..errors import LoadError
from ..quantization import Fp8Config, Mxfp4Config
from ..schemes import FP8_DTYPE
from .names import parse_expert_name

#: the block of DeepSeek-style ``weight_scale_inv`` scales when the checkpoint's config names none
DEFAULT_BLOCK = (128, 128)

#: ``header(name) -> (shape, torch dtype or None, dtype as the checkpoint names it)``
Header = Callable[[str], tuple[list, "torch.dtype | None", str]]


@dataclass(frozen=True)
class Fp8Format:
    """A pre-quantized fp8 e4m3 checkpoint's experts. granularity: ``block``, ``channel`` or ``tensor``.
    block_shape: a block format's ``weight_block_size`` from the checkpoint's config (None: none was given)."""

    granularity: str
    block_shape: tuple[int, int] | None = None

    def config(self) -> Fp8Config:
        """The ``Fp8Config`` of a layer that takes these weights and scales as they are."""
        if self.granularity == "block":
            return Fp8Config(scheme="block", block_shape=self.block_shape or DEFAULT_BLOCK)
        return Fp8Config(scheme=self.granularity)

    def describe(self) -> str:
        if self.granularity == "block" and self.block_shape is None:
            return ("fp8 with block scales (weight_scale_inv): Fp8Config('block', block_shape=...) of the block "
                    "its quantization_config.weight_block_size names")
        return f"pre-quantized as {self.config()}"


def mxfp4_packed(blocks: torch.Tensor, dims: int) -> torch.Tensor:
    """GPT-OSS's MXFP4 ``*_blocks`` (``[..., N, K/32, 16]``, ``dims + 1`` dims: 4 for all experts, 3 for one) as
    the layer's packed ``[..., N, K/2]`` (a view); a tensor of any other rank is left for the loader's shape
    check to name."""
    return blocks.flatten(-2) if blocks.dim() == dims + 1 else blocks


def block_size_of(config) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of a model config (a transformers config or a ``config.json``
    dict; the quantization config itself a dict or an object), or None."""
    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    qc = get(config, "quantization_config") if config is not None else None
    block = get(qc, "weight_block_size") if qc else None
    return tuple(block) if block else None  # ints: made so (and checked) only for a block checkpoint


def detect_fp8(where: str, names: Iterable[str], header: Header, block_size=None) -> Fp8Format | None:
    """The format of one MoE block's expert tensors ``names`` (their weights, scales, biases), or None for a
    float checkpoint; ``LoadError`` (starting with ``where``) for one that cannot be read as it is."""
    parsed = [(n, p) for n in names if (p := parse_expert_name(n)) is not None]
    weights = [n for n, p in parsed if p.kind == "weight"]
    fp8 = [n for n in weights if header(n)[1] == FP8_DTYPE]
    if not fp8:
        bad = [n for n in weights if header(n)[1] is None or not header(n)[1].is_floating_point]
        if bad:
            raise LoadError(f"{where}: expert tensors of dtype {header(bad[0])[2]} are not supported: {bad[:3]}")
        return None
    if len(fp8) != len(weights) or any(p.expert is None for _, p in parsed):
        raise LoadError(f"{where}: only per-expert fp8 checkpoints are read, and all expert weights must be fp8 "
                        f"(got {len(fp8)} fp8 of {len(weights)})")
    scales = [(n, p) for n, p in parsed if p.kind == "scale"]
    if not scales:
        raise LoadError(f"{where}: fp8 expert weights without weight_scale / weight_scale_inv: {fp8[0]}")
    if any(p.scale_inv for _, p in scales):
        return Fp8Format("block", tuple(int(b) for b in block_size) if block_size else None)
    first = scales[0][0]
    rows = header(first.rsplit(".", 1)[0] + ".weight")[0][0]
    shape = list(header(first)[0])
    n = 1
    for d in shape:
        n *= d
    if n == 1:
        return Fp8Format("tensor")
    if n == rows:
        return Fp8Format("channel")
    raise LoadError(f"{where}: cannot tell the fp8 granularity of {first} {shape} (weight rows {rows})")


def detect_prequantized(where: str, names: Iterable[str], header: Header, block_size=None):
    """The quant config one MoE block's pre-quantized experts need as they are: ``Mxfp4Config()`` for GPT-OSS's
    MXFP4 (``*_blocks`` with their ``*_scales``), the ``Fp8Config`` of an fp8 checkpoint (``detect_fp8``), or None
    for float experts; ``LoadError`` (starting with ``where``) for a mix or a missing half."""
    parsed = [(n, p) for n in names if (p := parse_expert_name(n)) is not None]
    mx = {(p.proj, p.kind) for _, p in parsed if p.kind.startswith("mxfp4")}
    if not mx:
        f = detect_fp8(where, names, header, block_size)
        return f.config() if f is not None else None
    floats = [n for n, p in parsed if p.kind in ("weight", "scale")]
    if floats:
        raise LoadError(f"{where}: MXFP4 expert blocks mixed with other expert weights ({floats[0]})")
    for proj in sorted({proj for proj, _ in mx}):
        for kind, what in (("mxfp4", "_blocks"), ("mxfp4_scale", "_scales")):
            if (proj, kind) not in mx:
                raise LoadError(f"{where}: MXFP4 experts' {proj}{what} is missing (blocks and scales come in pairs)")
    return Mxfp4Config()


def detect_source_fp8(specs: Iterable[tuple], block_size=None) -> Fp8Format | None:
    """The one fp8 format of every MoE block of a source's ``(name, tensor, origin)`` specs (tensors may be
    meta: only shapes and dtypes are used), or None when it has none or several; ``LoadError`` as
    ``detect_fp8``."""
    blocks: dict[str, list[str]] = {}
    headers = {}
    for name, tensor, _ in specs:
        headers[name] = (list(tensor.shape), tensor.dtype, str(tensor.dtype).removeprefix("torch."))
        parsed = parse_expert_name(name)
        if parsed is not None:
            blocks.setdefault(parsed.prefix, []).append(name)
    found = {detect_fp8(prefix or "the checkpoint", names, headers.__getitem__, block_size)
             for prefix, names in blocks.items()}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


__all__ = ["DEFAULT_BLOCK", "Fp8Format", "block_size_of", "detect_fp8", "detect_prequantized", "detect_source_fp8",
           "mxfp4_packed"]
