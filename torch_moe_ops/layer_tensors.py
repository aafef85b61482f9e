"""``FusedMoE``'s tensors (docs/design.md §2, §10.1): their registration, ``nn.Module``'s conversions
(``to`` / ``half`` / ``float`` / ``to_empty`` / ``cuda``), ``reset_parameters`` and the forward readiness check.

- **Meta construction.** A layer built under ``torch.device("meta")`` holds no data. ``to_empty(device=...)``
  gives it its final storage (quantized storage included); ``_apply`` then calls ``reset_parameters``:
  biases and the correction bias zero, scales one, placement tables as at construction, ``expert_load``
  zero, ``weight_loader`` re-attached to the (possibly new) Parameter objects, and a fresh load state, so
  loading streams as for a layer built on its device.
- **dtype casts never touch quantized data.** ``model.to(torch.bfloat16)``, ``half()``, ``float()`` cast
  every floating tensor, fp8 storage included. ``_apply`` keeps the dtype of a quantized layer's weights
  and scales and of ``e_score_correction_bias`` (probing ``fn`` on an empty tensor tells its device part
  from its dtype part): a device move still happens; without one the tensor is kept as it is (every
  ``data_ptr`` too). Everything else follows the cast (unquantized weights, biases), and ``params_dtype``
  (the staging dtype of later loads, the compute dtype of the input check) follows it.
- **Copies and state dicts.** ``copy.deepcopy`` / unpickling and ``load_state_dict(assign=True)`` re-attach
  ``weight_loader`` to the new Parameters (``assign`` also moves ``params_dtype`` to the assigned tensors'); a
  state whose quantized storage has another dtype (int8 vs fp8 have the same shapes) is refused unwritten.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .errors import LoadError, TornWeightsError
from .loading import LOADABLE, WeightLoader

#: parameters whose dtype a cast never changes, always / in quantized layers
_KEEP_DTYPE = ("e_score_correction_bias",)
_KEEP_DTYPE_QUANTIZED = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")
_PARAMS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TensorMethods:
    """``FusedMoE``'s tensor methods; need ``self.loader``, ``self.quant_config``, ``self.params_dtype``,
    ``self.placement``, ``self.weight_loader`` and ``self._where`` from the layer."""

    def _register_weights(self, E: int, N1: int, H: int, I: int, dev: torch.device) -> None:
        qc, dtype = self.quant_config, self.params_dtype

        def param(t):
            return nn.Parameter(t, requires_grad=False)

        if qc is None:
            self.w13_weight = param(torch.empty(E, N1, H, dtype=dtype, device=dev))
            self.w2_weight = param(torch.empty(E, H, I, dtype=dtype, device=dev))
            self.register_parameter("w13_weight_scale", None)
            self.register_parameter("w2_weight_scale", None)
            self.full_precision = {"w13_weight": self.w13_weight, "w2_weight": self.w2_weight}
        else:
            wdtype = qc.weight_dtype()
            self.w13_weight = param(torch.empty(qc.storage_shape(E, N1, H), dtype=wdtype, device=dev))
            self.w2_weight = param(torch.empty(qc.storage_shape(E, H, I), dtype=wdtype, device=dev))
            # per-tensor formats: one w13 scale per gate/up half, and w2 scales [E]
            sharded = qc.quant_scheme.weight.sharded
            s13 = qc.scale_shape(E, N1, H, self.loader.layout.w13_shards)
            s2 = qc.scale_shape(E, H, I, 0 if sharded else 1)
            self.w13_weight_scale = param(torch.ones(s13, dtype=torch.float32, device=dev))
            self.w2_weight_scale = param(torch.ones(s2, dtype=torch.float32, device=dev))
            #: the model-format (checkpoint) weights: meta tensors, shape and dtype only (no memory).
            self.full_precision = {"w13_weight": torch.empty(E, N1, H, dtype=dtype, device="meta"),
                                   "w2_weight": torch.empty(E, H, I, dtype=dtype, device="meta")}
        if self.has_bias:
            self.w13_bias = param(torch.zeros(E, N1, dtype=dtype, device=dev))
            self.w2_bias = param(torch.zeros(E, H, dtype=dtype, device=dev))
        else:
            self.register_parameter("w13_bias", None)
            self.register_parameter("w2_bias", None)
        if self.use_correction_bias:  # routing bias: one per logical expert, never sharded
            self.e_score_correction_bias = param(torch.zeros(self.num_experts, dtype=torch.float32, device=dev))
        else:
            self.register_parameter("e_score_correction_bias", None)
        self._attach_weight_loaders()

    def _register_tables(self, dev: torch.device) -> None:
        """Placement buffers (non-persistent: never in a checkpoint); ``expert_map`` None = every id local."""
        if self.placement is None:
            self.register_buffer("expert_map", None, persistent=False)
            return
        for name, t in self._initial_tables().items():
            self.register_buffer(name, None if t is None else t.to(dev), persistent=False)
        #: per-physical-expert count of (token, slot) pairs routed from this rank's tokens since the last reset
        self.register_buffer("expert_load", torch.zeros(self.num_physical_experts, dtype=torch.int64, device=dev),
                             persistent=False)

    def _initial_tables(self) -> dict:
        """The placement tables at construction, built on the host (also under ``torch.device("meta")``)."""
        with torch.device("cpu"):
            return self.placement.initial_tables()

    def _on_meta(self) -> bool:
        return self.w13_weight.device.type == "meta"  # a FakeTensor reports its fake device: never meta here

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` with the dtype guard and the meta -> device re-initialisation (module doc).
        Children (``shared_experts``) get ``fn`` as it is."""
        new_dtype = self._cast_dtype(fn)  # raises before anything is converted
        was_meta = self._on_meta()
        if recurse:
            for module in self.children():
                module._apply(fn)
        kept, moves = {}, {}
        for name in self._kept_dtype():
            t = self._parameters.get(name)
            if t is None:
                continue
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if probe.dtype == t.dtype:
                continue  # fn does not cast it: it applies as it is
            if probe.device == t.device:
                kept[name] = t  # only the cast would happen: keep the tensor (and its address)
            else:
                moves[id(t)] = probe.device

        def guarded(t):
            device = moves.get(id(t))
            return fn(t) if device is None else t.to(device=device)  # the device part only

        for name in kept:  # hidden from nn.Module._apply (works on the set_data and swap_tensors paths)
            self._parameters[name] = None
        try:
            super()._apply(guarded, recurse=False)
        finally:
            self._parameters.update(kept)
        if new_dtype is not None:
            self._set_params_dtype(new_dtype)
        self._attach_weight_loaders()
        self._refresh_full_precision()
        if was_meta and not self._on_meta():
            self.reset_parameters()
        elif not was_meta and self._on_meta():
            self._fresh_loader()  # to("meta"): the data is gone
        return self

    def _cast_dtype(self, fn) -> torch.dtype | None:
        """The ``params_dtype`` that ``fn`` casts to (None: no cast); ``TypeError`` for one the layer cannot
        compute in (``double()``, ``type(torch.int8)``)."""
        probe = fn(torch.empty(0, dtype=self.params_dtype, device=self.w13_weight.device))
        if probe.dtype == self.params_dtype:
            return None
        if probe.dtype not in _PARAMS_DTYPES:
            raise TypeError(f"{self._where()}: cannot convert the layer to {probe.dtype}: params_dtype must be "
                            "bfloat16, float16 or float32 (nothing of this layer was converted)")
        return probe.dtype

    def _set_params_dtype(self, dtype: torch.dtype) -> None:
        self.params_dtype = dtype
        self.loader.layout = dataclasses.replace(self.loader.layout, params_dtype=dtype)

    def _kept_dtype(self) -> tuple:
        """Parameters whose dtype never changes (their values are codes or fp32 scales)."""
        return _KEEP_DTYPE + (_KEEP_DTYPE_QUANTIZED if self.quant_config is not None else ())

    def _state_dict_problems(self, state_dict, prefix: str, assign: bool) -> list[str]:
        """Why ``load_state_dict`` must not touch this layer (checked before it writes anything): quantized
        storage of another dtype (an int8 state into fp8 storage of the same shape would be cast code by code);
        with ``assign=True``, a scale that is not fp32, or full-precision tensors (weights
        of an unquantized layer, biases) that do not share one of bf16 / fp16 / fp32 (the new ``params_dtype``).
        A correction bias may come in any float dtype (transformers' bf16 models hold it in bf16)."""
        problems, kept = [], self._kept_dtype()
        exact = _KEEP_DTYPE_QUANTIZED[:2] if self.quant_config is not None else ()  # quantized storage
        exact += _KEEP_DTYPE_QUANTIZED[2:] if self.quant_config is not None and assign else ()  # assigned scales
        dtypes = {}
        for name, p in self._parameters.items():
            t = state_dict.get(prefix + name)
            if p is None or not isinstance(t, torch.Tensor):
                continue
            if name in kept and t.dtype != p.dtype and (name in exact or not t.is_floating_point()):
                problems.append(f"{self._where()}: {prefix + name} has dtype {t.dtype}, but the layer holds "
                                f"{p.dtype} ({self.quant_scheme} storage and fp32 scales are never cast); build the "
                                "layer with the quant_config that saved the state")
            elif name not in kept:
                dtypes[name] = t.dtype
        if assign and dtypes:
            own = {n: p.dtype for n, p in self._parameters.items() if p is not None and n not in kept}
            found = set({**own, **dtypes}.values())
            if len(found) > 1 or not found <= set(_PARAMS_DTYPES):
                problems.append(f"{self._where()}: load_state_dict(assign=True) would leave full-precision tensors "
                                f"of dtypes {sorted(map(str, found))}; they must share one of bf16 / fp16 / fp32")
        return problems

    def _after_state_dict(self, assign: bool) -> None:
        """``load_state_dict`` replaced Parameters (``assign=True``): re-attach ``weight_loader`` (also onto a
        Parameter another layer shared), let ``params_dtype`` follow the assigned full-precision tensors."""
        if assign:
            own = [p.dtype for n, p in self._parameters.items() if p is not None and n not in self._kept_dtype()]
            if own and own[0] != self.params_dtype:
                self._set_params_dtype(own[0])
        self._attach_weight_loaders()
        self._refresh_full_precision()

    def __setstate__(self, state) -> None:
        """``copy.deepcopy`` / unpickling: a copied Parameter loses its attributes, so re-attach ``weight_loader``."""
        super().__setstate__(state)
        self._attach_weight_loaders()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise everything except the expert weights and start a fresh load (``load_state`` ``fresh``;
        forward refuses until the weights are loaded again): ``w13_bias`` / ``w2_bias`` and
        ``e_score_correction_bias`` zero, scales one, the placement tables as at construction (collective in
        spirit: every rank resets), ``expert_load`` zero. Writes in place (every ``data_ptr`` is kept).

        ``to_empty`` calls it on a meta-built layer; FSDP / torchtitan-style code that calls
        ``reset_parameters()`` after ``to_empty`` gets the same result."""
        for name in ("w13_bias", "w2_bias", "e_score_correction_bias"):
            t = getattr(self, name)
            if t is not None:
                t.zero_()
        for name in ("w13_weight_scale", "w2_weight_scale"):
            t = getattr(self, name)
            if t is not None:
                t.fill_(1.0)
        if self.placement is not None:
            for name, table in self._initial_tables().items():
                if table is not None:
                    getattr(self, name).copy_(table)
            self.expert_load.zero_()
        self._attach_weight_loaders()
        self._refresh_full_precision()
        self._fresh_loader()

    def _fresh_loader(self) -> None:
        self.loader = WeightLoader(self.loader.layout, self.quant_config, self._where)

    def _attach_weight_loaders(self) -> None:
        """``param.weight_loader`` (vLLM-style loaders call it) on the current Parameter objects."""
        for name in LOADABLE:  # what the checkpoint fills through weight_loader
            p = getattr(self, name, None)
            if p is not None:
                p.weight_loader = self.weight_loader

    def _refresh_full_precision(self) -> None:
        """``full_precision``: the parameters themselves (unquantized), else meta descriptors in ``params_dtype``."""
        if self.quant_config is None:
            self.full_precision = {"w13_weight": self.w13_weight, "w2_weight": self.w2_weight}
        else:
            self.full_precision = {n: torch.empty(t.shape, dtype=self.params_dtype, device="meta")
                                   for n, t in self.full_precision.items()}

    def _check_ready(self) -> None:
        """Refuse to compute on weights that are not a complete, consistent set: a meta layer (no data), a fresh
        layer (its storage is uninitialised memory), an incomplete load, a torn reload. Python flags and a
        device, never a tensor value: under torch.compile Dynamo guards on them (no host sync)."""
        if self._on_meta():
            raise LoadError(f"{self._where()}: the layer is on the meta device (no data): give it storage with "
                            "model.to_empty(device=...), then load its weights (load_checkpoint, load_weights or "
                            "weight_loader) and call torch_moe_ops.finalize_loading(model)")
        if not self.loader.streamer.ready:
            err = TornWeightsError if self.loader.streamer.torn else LoadError
            raise err(self.loader.not_ready_message())


__all__ = ["TensorMethods"]
