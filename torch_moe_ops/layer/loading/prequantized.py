"""Pre-quantized fp8 checkpoint pieces (docs/design.md §11): which dtypes and scale shapes a layer takes, and
where each piece goes. Plain functions of the layer's ``ExpertLayout`` and quant config; the weight format
(``quant_config.quant_scheme.weight``) answers the scale layout, so no scheme name is compared here.

Checkpoint scales are multipliers, ``real = q * scale`` (DeepSeek's ``weight_scale_inv`` included), fp32 or
bf16, of an ``[out, in]`` fp8 e4m3fn weight ``[N, K]``, and must match the layer's own layout (never guessed):

- per tensor (``fmt.sharded``): one value (``[]``, ``[1]``); a fused gate_up may give ``[2]`` (gate, up);
- per channel: ``[N]`` or ``[N, 1]``;
- per block: ``[ceil(N / bn), ceil(K / bk)]`` for the layer's ``block_shape`` ``(bn, bk)``.

A gate or up piece on its own fills its own rows of the w13 scale, so its rows must be whole scale rows:
per-tensor needs the gate/up halves layout, a block scale ``I % bn == 0`` and no interleaving; otherwise the
gate and up tiles straddle and the piece is refused (a fused gate_up piece has no such limit).
"""
from __future__ import annotations

from typing import Callable

import torch

from ...schemes import FP8_DTYPE, cdiv
from .keys import SCALES, WEIGHTS
from .layout import ExpertLayout

_SCALE_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "uint8 (E8M0 bytes)"}


class Prequantized:
    """The pre-quantized side of one layer's loader. layout: its shapes; quant_config: None or a QuantConfig."""

    def __init__(self, layout: ExpertLayout, quant_config, where: Callable[[], str]):
        self.layout, self.quant_config, self.where = layout, quant_config, where
        fmt = quant_config.quant_scheme.weight if quant_config is not None else None
        takes = fmt is not None and fmt.codec.checkpoint_dtype is not None  # fp8 and mxfp4 checkpoints are read
        self.fmt = fmt if takes else None  #: None: the layer takes no pre-quantized pieces
        self.block = quant_config.block if takes else None

    # ---------------------------------------------------------------------------------------- checks
    def classify(self, name: str, dtype: torch.dtype, where: str) -> bool:
        """True for a pre-quantized piece (an fp8 e4m3fn weight, or a scale), False for a full-precision weight;
        raises ``TypeError`` for a dtype or a layer that cannot take it."""
        if name in SCALES:
            self.require(where, "a weight scale (of a pre-quantized checkpoint)")
            if dtype not in self.fmt.codec.checkpoint_scale_dtypes:
                names = " or ".join(_SCALE_DTYPE_NAMES[d] for d in self.fmt.codec.checkpoint_scale_dtypes)
                raise TypeError(f"{where}: weight scales must be {names}, got {dtype}")
            return True
        if dtype == FP8_DTYPE:
            self.require(where, "a pre-quantized float8_e4m3fn weight", dtype)
            return True
        if self.fmt is not None and dtype == self.fmt.codec.checkpoint_dtype:  # mxfp4: the packed E2M1 bytes
            return True
        if dtype.is_floating_point and dtype.itemsize == 1:
            raise TypeError(f"{where}: {dtype} weights are not read; pre-quantized checkpoints must be float8_e4m3fn "
                            "(e4m3, the format of the fp8 kernels)")
        if not dtype.is_floating_point:
            mx = (" (uint8 weights are pre-quantized mxfp4 bytes, read by FusedMoE(quant_config=Mxfp4Config()) "
                  "with their uint8 E8M0 scales)") if dtype == torch.uint8 else ""
            raise TypeError(f"{where}: checkpoint weights must be bf16/fp16/fp32, or float8_e4m3fn with their scales "
                            f"(pre-quantized), got {dtype}{mx}")
        return False

    def require(self, where: str, what: str, dtype: torch.dtype | None = None) -> None:
        """Refuse a pre-quantized piece unless the layer stores weights of its format (``dtype``: the piece's
        weight dtype, which must be the layer's checkpoint dtype), naming the layer's config."""
        if self.fmt is None or (dtype is not None and dtype != self.fmt.codec.checkpoint_dtype):
            qc = self.quant_config
            has = "full-precision weights" if qc is None else f"{qc.quant_scheme.weight.name} weights"
            raise TypeError(f"{where}: {what} cannot fill this layer: its quant_config "
                            f"is {qc!r} ({has}); load it into FusedMoE(quant_config=Fp8Config(...)) of the "
                            "checkpoint's granularity, or load a bf16/fp16/fp32 checkpoint")

    def shard_error(self, shard: str) -> str | None:
        """Why a gate (w1) or up (w3) piece cannot fill its rows of the w13 scale alone (None: it can)."""
        lay, g = self.layout, self._w13_group()
        if shard not in ("w1", "w3") or not lay.gated or g == 1 or (not lay.activation.interleaved
                                                                    and lay.intermediate % g == 0):
            return None
        unit = f"scale tile of {list(self.block)}" if self.block is not None else "per-tensor scale"
        if lay.activation.interleaved:
            return (f"gate and up rows are interleaved ({lay.activation.name}), so each {unit} covers both: load "
                    "the fused gate_up (shard_id=None) or a full-precision checkpoint")
        return (f"intermediate_size I={lay.intermediate} is not a multiple of the block's {self.block[0]} rows, so "
                f"the w13 tiles straddle gate and up (gate rows [0, {lay.intermediate}), up rows "
                f"[{lay.intermediate}, {2 * lay.intermediate})): load the fused gate_up (shard_id=None), or a "
                "full-precision checkpoint to quantize online")

    def check_piece(self, name: str, shard: str, shape, transposed: bool | None, where: str) -> None:
        """The checks of a pre-quantized piece beyond its dtype: a gate/up piece that can fill its rows alone,
        an ``[out, in]`` layout, a scale of the layer's layout (``shape``: one expert's; None: not on this rank)."""
        problem = self.shard_error(shard) or (transposed and "pre-quantized pieces must be [out, in] (their scales "
                                                           "are laid out for it); transposed=True is not supported")
        if problem:
            raise ValueError(f"{where}: {problem}")
        if name in SCALES and shape is not None:
            self._check_scale_shape(shape, name, shard, where)

    def _check_scale_shape(self, shape, name: str, shard: str, where: str) -> None:
        """A checkpoint scale (one expert, full I) must have a shape of the layer's own layout."""
        shape, forms = tuple(shape), self._forms(name, shard)
        if shape in forms:
            return
        N, K = self._dims(name, shard)
        text = " or ".join(str(list(f)) for f in forms)
        hint = ""
        if self.fmt.quantizer == "blocks" and len(shape) == 2:
            fits = _blocks_fitting(N, K, shape)
            hint = (f"; it is the grid of block {list(fits)}: a checkpoint quantized with weight_block_size "
                    f"{list(fits)}? build the layer with Fp8Config('block', block_shape={fits})") if fits else ""
        raise ValueError(f"{where}: scale shape {list(shape)} is not a scale of this layer's {self.quant_config!r} "
                         f"for a [{N}, {K}] weight (expects {text}){hint}")

    def stored_shape(self, expected: tuple) -> tuple:
        """A pre-quantized weight's ``[out, in]`` shape for a logical ``expected`` one (mxfp4: ``in / 2`` bytes)."""
        return tuple(self.fmt.packed_shape(expected))

    # ---------------------------------------------------------------------------------------- writes
    def prepare(self, name: str, t: torch.Tensor, shard: str) -> torch.Tensor:
        """One expert's checked piece as this rank's local rows: weights TP-sliced, scales fp32 in the layer's
        shape for ``destination`` (a per-tensor value broadcast to the entries it fills)."""
        lay = self.layout
        if name in WEIGHTS:
            return lay.tp_slice(name, t, shard, pack=self.fmt.pack)
        canon = self._forms(name, shard)[0]
        s = t.to(self.fmt.scale_dtype)
        if self.fmt.sharded:  # a TP slice keeps the tensor's scale
            return s.reshape(1).expand(canon) if s.numel() == 1 else s.reshape(canon)
        s = s.reshape(canon)  # [N, 1] -> [N]
        if lay.tp_size == 1:
            return s
        bn, bk = self.block or (1, 1)
        if name == "w2_weight_scale":  # rows are H (not sliced); a block scale's columns follow I
            if self.block is None:
                return s
            cols = lay.tp_slice("w2_weight", torch.arange(lay.intermediate_full)[None], "w2")[0]
            return s[:, cols[::bk] // bk]
        rows = lay.tp_slice("w13_weight", torch.arange(self._dims(name, shard)[0]), shard)  # this rank's rows
        return s[rows[::bn] // bn]

    def write(self, streamer, params, name: str, t: torch.Tensor, e: int, shard: str) -> None:
        """Write one expert's piece. A first load writes in place (forward refuses until finalize); a reload holds
        a copy (``streamer.hold``) until every weight and scale piece of the projection arrived, so forward never
        pairs a new weight with an old scale."""
        t = self.prepare(name, t, shard)
        dest = self.destination(params, name, e, shard)
        if not streamer.rounds:
            dest.copy_(t)
            return
        held = torch.empty(dest.shape, dtype=dest.dtype, device=dest.device)
        held.copy_(t)
        streamer.hold(e, name.split("_")[0], held.numel() * held.element_size(),
                      lambda now: self.destination(now, name, e, shard).copy_(held))

    def destination(self, params, name: str, e: int, shard: str) -> torch.Tensor:
        """The view of local slot ``e`` that a prepared piece fills (weights: its rows; scales: its entries)."""
        lay = self.layout
        if name in WEIGHTS:
            return lay.rows(params[name][e], shard)
        scale = params[name]
        if name == "w2_weight_scale":
            return scale[e : e + 1] if scale.dim() == 1 else scale[e]  # per-tensor w2 scales are [E]
        full, g = scale[e], self._w13_group()
        if shard not in ("w1", "w3") or not lay.gated:
            return full
        if g == 1:
            return lay.rows(full, shard)
        n = lay.intermediate // g  # halves layout, whole scale rows (shard_error)
        return full[:n] if shard == "w1" else full[n:]

    # ---------------------------------------------------------------------------------------- layout
    def _w13_group(self) -> int:
        """Rows of the local w13 that one row of its scale covers."""
        if self.fmt.sharded:
            return self.layout.n1 // self.layout.w13_shards
        return self.block[0] if self.block is not None else 1

    def _dims(self, name: str, shard: str) -> tuple[int, int]:
        """``[N, K]`` of the checkpoint weight (full I) that a scale piece belongs to."""
        return self.layout.expected_shape(name.removesuffix("_scale"), shard)

    def _forms(self, name: str, shard: str) -> list[tuple]:
        """Accepted checkpoint scale shapes; the first is the layer's own (``fmt.scale_shape``)."""
        N, K = self._dims(name, shard)
        shards = self.layout.w13_shards if self.fmt.sharded and shard == "w13" else 1  # fused: gate, up apart
        canon = tuple(self.fmt.scale_shape((N, K), self.block, shards))
        forms = [canon] + ([canon + (1,)] if len(canon) == 1 else [])
        return forms + [f for f in ((), (1,)) if self.fmt.sharded and f not in forms]


def _blocks_fitting(N: int, K: int, grid) -> tuple[int, int] | None:
    """A power-of-two block whose grid over ``[N, K]`` is ``grid`` (square preferred): for messages only."""
    sizes = [2**i for i in range(11)]
    fits = [(bn, bk) for bn in sizes for bk in sizes if (cdiv(N, bn), cdiv(K, bk)) == tuple(grid)]
    return min(fits, key=lambda b: (b[0] != b[1], b)) if fits else None


__all__ = ["Prequantized"]
