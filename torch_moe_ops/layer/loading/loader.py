"""The ``weight_loader`` contract (docs/design.md §10, §11): one checkpoint tensor -> a layer's slots.

``WeightLoader`` owns the layer's ``ExpertStreamer`` and knows the layer only through an
``ExpertLayout`` (plain shapes and placement) and the ``LoadTargets`` handed in with each call (the
tensors to write and the logical -> physical lookup); it never reads the layer object.

Every call is checked in full before anything is written or recorded (``check``: names, shape, dtype,
expert id, a piece loaded twice, then the values: no meta tensor, no NaN/Inf); ``write`` records a piece
only once its write succeeded. A write that fails anyway (out of memory, a device error) during a reload
tears the layer (``ExpertStreamer.tear``): its forward refuses until a complete reload.

An fp8 layer also takes pre-quantized pieces (``prequantized.py``): an e4m3 weight is written as it is (no
re-quantization) and its scale into the layer's scale; the streamer requires both (``keys.py``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ...errors import LoadError, TornWeightsError
from ...ops import quantize_weight_into
from .checks import check_finite, check_materialized, check_scale
from .keys import mixed_formats
from .layout import ExpertLayout, orientation
from .prequantized import Prequantized
from .streamer import (BIASES, CORRECTION, LOADABLE, PREQUANTIZED, SCALES, WEIGHTS, ExpertStreamer, describe,
                       required_keys)

_SHARDS = ("w1", "w2", "w3")


@dataclass(frozen=True)
class LoadTargets:
    """What one load call writes into, taken from the layer at call time (parameters may be rebound).

    params: ``w13_weight``, ``w2_weight``, their ``*_scale`` (quantized layers), ``w13_bias``, ``w2_bias``,
    ``e_score_correction_bias`` (None where the layer has none). full_precision: the meta descriptors of
    a quantized layer's checkpoint-format weights (accepted as ``param``). physical_ids: logical expert
    -> the global physical slots that hold it."""

    params: Mapping[str, torch.Tensor | None]
    full_precision: Mapping[str, torch.Tensor]
    physical_ids: Callable[[int], list[int]]


@dataclass(frozen=True)
class Piece:
    """One checked ``weight_loader`` call, decided on shapes alone (so it can come from a file header).

    slots: ``(index, physical, local)`` per local slot written: ``index`` is the logical expert of an
    all-experts tensor (``loaded[index]``), None for a per-expert one. keys: the pieces each slot records.
    transpose: the checkpoint tensor is an ``[in, out]`` export. where: the call, for messages.
    prequantized: an fp8 e4m3 weight or a weight scale, written as it is."""

    name: str
    shard: str | None
    slots: tuple
    keys: tuple
    transpose: bool
    where: str
    prequantized: bool = False

    @property
    def all_keys(self) -> list:
        return [k for keys in self.keys for k in keys]


class WeightLoader:
    """Validates, orients, TP-slices, stages and (with a quant config) quantizes checkpoint tensors.

    layout: the layer's shapes and placement. quant_config: None or a ``QuantConfig`` (asked for its
    scheme strings and format). where: the layer's name for messages (called when a message is built)."""

    def __init__(self, layout: ExpertLayout, quant_config, where: Callable[[], str]):
        self.layout = layout
        self.quant_config = quant_config
        self.where = where
        self.pre = Prequantized(layout, quant_config, where)
        self.streamer = ExpertStreamer(
            required_keys(layout.num_local, layout.gated, layout.has_bias, layout.correction_bias), layout.gated,
            stages_w13=quant_config is not None)

    # ---------------------------------------------------------------------------------------- entry
    def load(self, targets: LoadTargets, param, loaded: torch.Tensor, shard_id: str | None = None,
             expert_id: int | None = None, *, transposed: bool | None = None) -> bool:
        """Load one checkpoint tensor (see ``FusedMoE.weight_loader``): checked in full, then written. True
        when something was copied (False: every addressed slot belongs to another rank)."""
        piece = self.check(targets, param, loaded, shard_id, expert_id, transposed=transposed)
        return self.write(targets, piece, loaded)

    def check_many(self, targets: LoadTargets, calls) -> list[Piece]:
        """``check`` each ``(param, loaded, shard_id, expert_id)`` and refuse a piece given twice among them."""
        pieces, given = [], set()
        for param, loaded, shard_id, expert_id in calls:
            piece = self.check(targets, param, loaded, shard_id, expert_id)
            for key in piece.all_keys:
                if key in given:
                    raise LoadError(f"{self.where()}: {describe(key)} is given twice")
                given.add(key)
            pieces.append(piece)
        mixed = mixed_formats(given)
        if mixed is not None:
            raise LoadError(f"{self.where()}: {mixed}")
        return pieces

    def finalize(self, *, strict_reload: bool = True) -> str:
        try:
            return self.streamer.finalize(strict_reload=strict_reload)
        except LoadError as exc:
            raise type(exc)(f"{self.where()}: {exc}") from None

    def not_ready_error(self, on_meta: bool) -> LoadError:
        """Why forward refuses to run: the layer is ``on_meta`` (no data), or ``streamer.ready`` is False (a
        fresh layer's storage is uninitialised memory, a load is incomplete, a reload tore the weights)."""
        s = self.streamer
        if on_meta:
            return LoadError(f"{self.where()}: the layer is on the meta device (no data): give it storage with "
                             "model.to_empty(device=...), then load its weights (load_checkpoint, load_weights or "
                             "weight_loader) and call torch_moe_ops.finalize_loading(model)")
        if s.torn:
            return TornWeightsError(f"{self.where()}: {s.torn_message()}")
        failed = f"; the last load failed: {s.failed}" if s.failed else ""
        return LoadError(f"{self.where()}: weights are not loaded ({s.state}{failed}); load every expert "
                         "(load_checkpoint, load_weights, weight_loader or load_state_dict) and call "
                         "torch_moe_ops.finalize_loading(model)")

    # ---------------------------------------------------------------------------------------- checks
    def check(self, targets: LoadTargets, param, loaded: torch.Tensor, shard_id=None, expert_id=None, *,
              transposed: bool | None = None, values: bool = True) -> Piece:
        """Every check of one call, writing and recording nothing. ``values=False`` skips the data checks
        (``check_values``), so ``loaded`` may be a meta tensor that stands for a file header."""
        name = self._resolve(targets, param)
        if not isinstance(loaded, torch.Tensor):
            raise TypeError(f"{self.where()}: loaded_weight must be a tensor, got {type(loaded).__name__}")
        float_only = name in BIASES or name == CORRECTION  # weights and scales: ``Prequantized.classify``
        if float_only and (not loaded.is_floating_point() or loaded.element_size() == 1):
            raise TypeError(f"{self.where()}: {name}: checkpoint tensors must be bf16/fp16/fp32 (biases stay in full "
                            f"precision, also in a pre-quantized checkpoint), got {loaded.dtype}")
        if targets.params["w13_weight"].is_meta:
            raise LoadError(f"{self.where()}: the layer was created on the meta device; pass device= the target device")
        lay = self.layout
        if name == CORRECTION:
            if tuple(loaded.shape) != (lay.num_experts,):
                raise ValueError(f"{self.where()}: {CORRECTION} must have shape [{lay.num_experts}], got "
                                 f"{list(loaded.shape)}")
            piece = Piece(name, None, ((None, None, None),), (((CORRECTION, None, None),),), False,
                          f"{self.where()}: {CORRECTION}")
        else:
            piece = self._expert_piece(targets, name, loaded, self._check_shard(name, shard_id), expert_id, transposed)
        try:
            self.streamer.check_new(piece.all_keys)
        except LoadError as exc:
            raise LoadError(f"{self.where()}: {exc}") from None
        if values:
            self.check_values(piece, loaded)
        return piece

    def check_values(self, piece: Piece, loaded: torch.Tensor) -> None:
        """The data checks of a checked piece: a real tensor without NaN/Inf in any slot it writes."""
        if not piece.slots:
            return  # another rank's expert: nothing is read
        check_materialized(loaded, piece.where)
        if piece.name in SCALES:  # scale values, decoded from the format's storage (an E8M0 byte 255 is NaN)
            check, values = check_scale, self.pre.fmt.codec.load_scale
        else:
            check, values = check_finite, lambda t: t
        indices = sorted({index for index, _, _ in piece.slots if index is not None})
        if not indices:
            check(values(loaded), piece.where)
        for e in indices:  # an all-experts tensor: name the expert the bad value belongs to
            check(values(loaded[e]), f"{self.where()}: {piece.name} expert {e} shard {piece.shard!r}", (e,))

    def _expert_piece(self, targets, name, loaded, shard, expert_id, transposed) -> Piece:
        lay, pre = self.layout, False
        if name not in BIASES:
            call = "(all experts)" if expert_id is None else f"expert {expert_id!r}"
            pre = self.pre.classify(name, loaded.dtype, f"{self.where()}: {name} {call} shard {shard!r}")
        if expert_id is None:
            per_expert_dim = 1 if name in BIASES else 2
            ok = loaded.dim() >= 1 if name in SCALES else loaded.dim() == per_expert_dim + 1
            if not ok or loaded.shape[0] != lay.num_experts:
                dims = "at least 1 dim" if name in SCALES else f"{per_expert_dim + 1} dims"
                raise ValueError(f"{self.where()}: {name} shard {shard!r} for all experts (expert_id=None) must "
                                 f"have {dims} with E={lay.num_experts} first, got {list(loaded.shape)}")
            # an all-experts tensor is indexed by logical expert; it fills every local physical replica
            slots = tuple((e, p, lay.local_slot(p)) for e in range(lay.num_experts) for p in targets.physical_ids(e)
                          if lay.local_slot(p) >= 0)
            shape, where = loaded.shape[1:], f"{self.where()}: {name} shard {shard!r} (all experts)"
        else:
            p = self._expert_index(expert_id)
            slots = ((None, p, lay.local_slot(p)),) if lay.local_slot(p) >= 0 else ()
            shape, where = loaded.shape, f"{self.where()}: {name} expert {p} shard {shard!r}"
        if pre:
            self.pre.check_piece(name, shard, shape if slots else None, transposed, where)
        # a pre-quantized weight is never transposed (its scale is laid out for [out, in]); packed: in / pack
        expected = lay.expected_shape(name, shard)
        expected = self.pre.stored_shape(expected) if pre and name in WEIGHTS else expected
        transpose = bool(slots) and name not in SCALES and orientation(
            shape, expected, False if pre else transposed, where)
        shards = (("w1", "w3") if lay.gated else ("w1",)) if shard == "w13" else (shard,)
        marks = (name,) + ((PREQUANTIZED,) if pre and name in WEIGHTS else ())  # PREQUANTIZED: see keys.py
        keys = tuple(tuple((n, e, s) for n in marks for s in shards) for _, _, e in slots)
        return Piece(name, shard, slots, keys, transpose, where, pre)

    def _expert_index(self, expert_id) -> int:
        n = self.layout.num_physical
        bad_type = isinstance(expert_id, bool) or type(expert_id).__name__ == "bool_" or (
            isinstance(expert_id, torch.Tensor) and (expert_id.dtype == torch.bool or expert_id.is_floating_point()
                                                     or expert_id.dim() != 0))  # a [1] tensor is not an id
        if not bad_type and not isinstance(expert_id, int) and hasattr(expert_id, "__index__"):
            try:
                expert_id = operator.index(expert_id)  # numpy / 0-dim integer ids
            except TypeError:
                bad_type = True
        if bad_type or not isinstance(expert_id, int):
            raise TypeError(f"{self.where()}: expert_id must be an int (a global physical expert in [0, {n})), a "
                            f"numpy integer or a 0-dim integer tensor, got {type(expert_id).__name__} {expert_id!r}")
        if not 0 <= expert_id < n:
            raise ValueError(f"{self.where()}: expert_id must be an int in [0, {n}), got {expert_id!r}")
        return expert_id

    def _resolve(self, targets: LoadTargets, param) -> str:
        params = targets.params
        if isinstance(param, str):
            name = param
        else:
            name = next((n for n in LOADABLE if params.get(n) is param), None)
            name = name or next((n for n, t in targets.full_precision.items() if t is param), None)
            if name is None:
                raise ValueError(f"{self.where()}: param must be one of this layer's {LOADABLE} (or its name)")
        if name in SCALES and params.get(name) is None:
            self.pre.require(f"{self.where()}: {name}", "a weight scale (of a pre-quantized checkpoint)")
        if name not in LOADABLE or params.get(name) is None:
            present = [n for n in LOADABLE if params.get(n) is not None]
            raise ValueError(f"{self.where()}: cannot load {name!r}; loadable parameters are {present}")
        return name

    def _check_shard(self, name: str, shard_id) -> str:
        if shard_id is None or shard_id == "w13":
            return "w2" if name.startswith("w2") else "w13"
        if shard_id not in _SHARDS:
            raise ValueError(f"{self.where()}: shard_id must be one of {_SHARDS} (or None for a fused tensor), "
                             f"got {shard_id!r}")
        if name.startswith("w2") != (shard_id == "w2"):
            raise ValueError(f"{self.where()}: shard {shard_id!r} does not belong to {name} (w1 = gate and w3 = up "
                             "load into w13_*, w2 = down into w2_*)")
        if shard_id == "w3" and not self.layout.gated:
            raise ValueError(f"{self.where()}: activation {self.layout.activation.name!r} is non-gated: there is no "
                             "w3 (load the checkpoint's up_proj as w1)")
        return shard_id

    # ---------------------------------------------------------------------------------------- writes
    def write(self, targets: LoadTargets, piece: Piece, loaded: torch.Tensor) -> bool:
        """Write a checked piece; each slot's pieces are recorded once its write succeeded. False when no slot
        is on this rank (nothing is written or recorded)."""
        if not piece.slots:
            return False
        streamer = self.streamer
        streamer.start()
        try:
            for (index, _, e), keys in zip(piece.slots, piece.keys):
                if piece.name == CORRECTION:
                    targets.params[CORRECTION].copy_(loaded)
                else:
                    self._write_slot(targets, piece, loaded if index is None else loaded[index], e)
                streamer.record(keys)
                if piece.prequantized and streamer.rounds:  # a reload: the projection's writes once it is complete
                    for apply in streamer.release(e, piece.name.split("_")[0]):
                        apply(targets.params)
        except BaseException as exc:
            if streamer.rounds:  # a reload: the slot may now hold part old, part new values
                streamer.tear(f"reload round {streamer.rounds + 1} failed writing {piece.where} "
                              f"({type(exc).__name__}: {exc})")
            raise
        streamer.complete_round()
        return True

    def _write_slot(self, targets: LoadTargets, piece: Piece, t: torch.Tensor, e: int) -> None:
        lay, name, shard = self.layout, piece.name, piece.shard
        if piece.prequantized:
            return self.pre.write(self.streamer, targets.params, name, t, e, shard)
        t = lay.tp_slice(name, t.transpose(0, 1) if piece.transpose else t, shard)
        if name in BIASES or self.quant_config is None:
            lay.rows(targets.params[name][e], shard).copy_(t)
        elif shard in ("w2", "w13"):  # the whole projection at once: quantize now
            self._quantize(targets, name, e, self._staged_copy(targets, t))
        else:
            streamer = self.streamer
            dev = targets.params["w13_weight"].device
            buf = streamer.stage_w13(  # full precision, logical [N1, H] (not the packed storage shape)
                e, lambda: torch.empty(lay.n1, lay.hidden_size, dtype=lay.params_dtype, device=dev))
            lay.rows(buf, shard).copy_(t)
            if streamer.mark_w13(e, shard):
                self._quantize(targets, name, e, buf)
                streamer.release_w13(e)

    def _staged_copy(self, targets: LoadTargets, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself when it is already on the target device in ``params_dtype``; else a transient copy."""
        dev, dtype = targets.params["w13_weight"].device, self.layout.params_dtype
        if t.device == dev and t.dtype == dtype and t.stride(-1) == 1:
            return t
        buf = torch.empty(t.shape, dtype=dtype, device=dev)
        buf.copy_(t)
        self.streamer.transient(buf.numel() * buf.element_size())
        return buf

    def _quantize(self, targets: LoadTargets, name: str, e: int, w: torch.Tensor) -> None:
        """Quantize one expert's full-precision projection ``w`` ([N1, H] or [H, I]) into its slot."""
        qc, params = self.quant_config, targets.params
        if name == "w13_weight":
            qweight, scale = params["w13_weight"][e], params["w13_weight_scale"][e]
            shards = self.layout.w13_shards if qc.quant_scheme.weight.sharded else 1
        else:
            qweight, shards, s2 = params["w2_weight"][e], 1, params["w2_weight_scale"]
            scale = s2[e : e + 1] if s2.dim() == 1 else s2[e]  # per-tensor w2 scales are [E]
        quantize_weight_into(w, qweight, scale, qc.weight_scheme, block_shape=qc.kernel_block_shape, shards=shards)
