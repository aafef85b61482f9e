"""The ``weight_loader`` contract (docs/design.md §10, §11): one checkpoint tensor -> a layer's slots.

``WeightLoader`` owns the layer's ``ExpertStreamer`` and knows the layer only through an
``ExpertLayout`` (plain shapes and placement) and the ``LoadTargets`` handed in with each call (the
tensors to write and the logical -> physical lookup); it never reads the layer object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..errors import LoadError
from .layout import ExpertLayout, orient
from .streamer import BIASES, CORRECTION, LOADABLE, ExpertStreamer, required_keys

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


class WeightLoader:
    """Validates, orients, TP-slices, stages and (with a quant config) quantizes checkpoint tensors.

    layout: the layer's shapes and placement. quant_config: None or a ``QuantConfig`` (asked for its
    scheme strings and format). where: the layer's name for messages (called when a message is built)."""

    def __init__(self, layout: ExpertLayout, quant_config, where: Callable[[], str]):
        self.layout = layout
        self.quant_config = quant_config
        self.where = where
        self.streamer = ExpertStreamer(
            required_keys(layout.num_local, layout.gated, layout.has_bias, layout.correction_bias), layout.gated)

    # ---------------------------------------------------------------------------------------- entry
    def load(self, targets: LoadTargets, param, loaded: torch.Tensor, shard_id: str | None = None,
             expert_id: int | None = None, *, transposed: bool | None = None) -> bool:
        """Load one checkpoint tensor (see ``FusedMoE.weight_loader``). True when something was copied
        (False: every addressed slot belongs to another rank)."""
        name = self._resolve(targets, param)
        if not isinstance(loaded, torch.Tensor):
            raise TypeError(f"{self.where()}: loaded_weight must be a tensor, got {type(loaded).__name__}")
        if not loaded.is_floating_point() or loaded.element_size() == 1:
            raise TypeError(f"{self.where()}: {name}: checkpoint tensors must be bf16/fp16/fp32 (weights are "
                            f"quantized online; pre-quantized checkpoints are not supported), got {loaded.dtype}")
        if targets.params["w13_weight"].is_meta:
            raise LoadError(f"{self.where()}: the layer was created on the meta device; pass device= the target device")
        if name == CORRECTION:
            self._load_correction(targets, loaded)
            copied = True
        else:
            shard = self._check_shard(name, shard_id)
            lay = self.layout
            if expert_id is None:
                per_expert_dim = 1 if name in BIASES else 2
                if loaded.dim() != per_expert_dim + 1 or loaded.shape[0] != lay.num_experts:
                    raise ValueError(f"{self.where()}: {name} shard {shard!r} for all experts (expert_id=None) must "
                                     f"have {per_expert_dim + 1} dims with E={lay.num_experts} first, got "
                                     f"{list(loaded.shape)}")
                # an all-experts tensor is indexed by logical expert; it fills every local physical replica
                copied = False
                for e in range(lay.num_experts):
                    for p in targets.physical_ids(e):
                        copied |= self._load_physical(targets, name, loaded[e], shard, p, transposed)
            else:
                if hasattr(expert_id, "__index__") and not isinstance(expert_id, bool):
                    expert_id = expert_id.__index__()  # numpy / 0-dim integer ids
                n = lay.num_physical
                if not isinstance(expert_id, int) or not 0 <= expert_id < n:
                    raise ValueError(f"{self.where()}: expert_id must be an int in [0, {n}), got {expert_id!r}")
                copied = self._load_physical(targets, name, loaded, shard, expert_id, transposed)
        self.streamer.complete_round()
        return copied

    def finalize(self, *, strict_reload: bool = True) -> str:
        try:
            return self.streamer.finalize(strict_reload=strict_reload)
        except LoadError as exc:
            raise LoadError(f"{self.where()}: {exc}") from None

    # ---------------------------------------------------------------------------------------- checks
    def _resolve(self, targets: LoadTargets, param) -> str:
        params = targets.params
        if isinstance(param, str):
            name = param
        else:
            name = next((n for n in LOADABLE if params.get(n) is param), None)
            name = name or next((n for n, t in targets.full_precision.items() if t is param), None)
            if name is None:
                raise ValueError(f"{self.where()}: param must be one of this layer's {LOADABLE} (or its name)")
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
    def _load_correction(self, targets: LoadTargets, loaded: torch.Tensor) -> None:
        E = self.layout.num_experts
        if tuple(loaded.shape) != (E,):
            raise ValueError(f"{self.where()}: {CORRECTION} must have shape [{E}], got {list(loaded.shape)}")
        self.streamer.begin([(CORRECTION, None, None)])
        targets.params[CORRECTION].copy_(loaded)

    def _load_physical(self, targets, name, t, shard, p, transposed) -> bool:
        """Load into global physical slot ``p`` if this rank holds it; False (nothing copied) otherwise."""
        e = self.layout.local_slot(p)
        if e < 0:
            return False
        self._load_slot(targets, name, t, shard, e, p, transposed)
        return True

    def _load_slot(self, targets, name, t, shard, e, p, transposed) -> None:
        lay = self.layout
        where = f"{self.where()}: {name} expert {p} shard {shard!r}"
        t = lay.tp_slice(name, orient(t, lay.expected_shape(name, shard), transposed, where), shard)
        shards = (("w1", "w3") if lay.gated else ("w1",)) if shard == "w13" else (shard,)
        keys = [(name, e, s) for s in shards]
        self.streamer.begin(keys)
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
        torch.ops.moe.quantize_weight_into(w, qweight, scale, qc.weight_scheme, block_shape=qc.kernel_block_shape,
                                           shards=shards)
