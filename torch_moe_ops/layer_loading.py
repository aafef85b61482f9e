"""The loading half of ``FusedMoE``'s API (docs/design.md §10, §11): ``weight_loader``, ``load_weights``,
``finalize_loading``, ``load_state_dict`` support and the load-state properties.

A mixin of ``FusedMoE`` (kept apart from the module and its forward in ``layer.py``); each method hands
the work to the layer's ``loading.WeightLoader`` (``self.loader``) with the layer's tensors as
``LoadTargets``.
"""
from __future__ import annotations

import torch

from .errors import LoadError, TornWeightsError
from .loading import LoadTargets, Piece, WeightLoader

#: what a load call may write: the weights, their scales (quantized layers), biases, the routing bias
_TARGETS = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias",
            "e_score_correction_bias")
#: ``weight_loader``'s third positional argument is a shard id when it is one of these (or None)
SHARD_IDS = ("w1", "w2", "w3", "w13")
_UNSET = object()  # shard_id / expert_id not given by keyword
_RENAMED = (ValueError, TypeError, LoadError, TornWeightsError)  # errors re-raised naming the checkpoint tensor


def _convention(where, args: tuple, weight_name, shard_id, expert_id, return_success):
    """``weight_loader``'s positional ``args`` (after ``loaded_weight``) and keywords -> (weight_name, shard_id,
    expert_id, return_success), by the rule of its docstring."""
    if args and args[0] is not None and not isinstance(args[0], str):
        raise TypeError(f"{where()}: weight_loader's third argument must be a shard id {SHARD_IDS}, None, or the "
                        f"checkpoint weight name (a str, vLLM's convention), got {type(args[0]).__name__}")
    # a shard-id-like str is still vLLM's weight_name when a shard id follows it (by keyword, or next: a str)
    vllm = bool(args) and args[0] is not None and (
        args[0] not in SHARD_IDS or shard_id is not _UNSET or (len(args) > 1 and isinstance(args[1], str)))
    names = ("weight_name", "shard_id", "expert_id", "return_success") if vllm else ("shard_id", "expert_id")
    if len(args) > len(names):
        raise TypeError(f"{where()}: weight_loader takes at most {len(names)} positional arguments after "
                        f"loaded_weight ({', '.join(names)}), got {len(args)}")
    given = {"weight_name": weight_name, "shard_id": shard_id, "expert_id": expert_id,
             "return_success": return_success}
    defaults = {"weight_name": None, "shard_id": _UNSET, "expert_id": _UNSET, "return_success": False}
    for name, value in zip(names, args):
        if given[name] is not defaults[name]:
            raise TypeError(f"{where()}: weight_loader got {name} twice (positionally and by keyword)")
        given[name] = value
    if given["weight_name"] is not None and not isinstance(given["weight_name"], str):
        raise TypeError(f"{where()}: weight_name must be a str, got {type(given['weight_name']).__name__}")
    return (given["weight_name"], None if given["shard_id"] is _UNSET else given["shard_id"],
            None if given["expert_id"] is _UNSET else given["expert_id"], given["return_success"])


class LoadingMethods:
    """``FusedMoE``'s loading methods; needs ``self.loader``, ``self.full_precision``, ``self.physical_ids``
    and ``self._where`` from the layer."""

    loader: WeightLoader

    @torch.no_grad()
    def weight_loader(self, param, loaded_weight: torch.Tensor, *args, shard_id=_UNSET, expert_id=_UNSET,
                      weight_name: str | None = None, return_success: bool = False, transposed: bool | None = None):
        """Copy (and, with a quant config, quantize) one checkpoint tensor into the layer (docs/design.md §11).

        Two calling conventions, positionally or by keyword (also as ``param.weight_loader``, the bound method):

        - ``weight_loader(param, loaded_weight, shard_id=None, expert_id=None)`` (this package's), and
        - vLLM's ``weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False)``
          (e.g. ``weight_loader(param, w, name, shard_id="w1", expert_id=3, return_success=True)``).

        The third positional argument decides: None or a shard id (``"w1"``, ``"w2"``, ``"w3"``, ``"w13"``) is a
        shard id, then ``expert_id`` may follow; any other str is the checkpoint weight name (e.g.
        ``"model.layers.0.mlp.experts.3.gate_proj.weight"``: errors then name it), then ``shard_id``,
        ``expert_id`` and ``return_success`` may follow. A weight name that equals a shard id (``"w1"``) is
        still read as the name when a shard id follows it (``shard_id=`` by keyword, or a str fourth).
        Anything else is a ``TypeError``.

        Args:
            param: ``w13_weight`` | ``w2_weight`` | ``w13_bias`` | ``w2_bias`` | ``e_score_correction_bias``
                (the parameter, its meta descriptor in ``full_precision``, or its name).
            loaded_weight: bf16/fp16/fp32 on any device. Per expert: w1/w3 [I, H], w2 [H, I]; fused gate_up
                [N1, H] (``shard_id`` None or ``"w13"``, in the layer's row order); with ``expert_id=None`` a
                leading [E] dim (logical experts). Biases drop the last dim. I is the checkpoint's (full) I.
            shard_id: ``"w1"`` (gate; ``up_proj`` of a non-gated layer), ``"w3"`` (up), ``"w2"`` (down).
            expert_id: global physical expert in [0, num_physical_experts), or None (all experts).
            weight_name: the checkpoint name, for messages only (vLLM passes it third).
            transposed: None infers a transposed [in, out] export from a non-square shape; True/False force.

        The call is checked in full before anything is written: a wrong shape or dtype, a meta tensor, a NaN
        or Inf, a bad ``expert_id`` (an int; a bool is refused) or a piece loaded twice in one round raises,
        naming the layer, expert and shard, and records nothing. A quantized projection is written the
        moment its last shard arrives; after ``finalize_loading`` a new complete set re-quantizes in place
        (reload). Returns, when ``return_success``, whether anything was copied (False: another rank's expert).
        """
        weight_name, shard_id, expert_id, return_success = _convention(
            self._where, args, weight_name, shard_id, expert_id, return_success)
        try:
            copied = self.loader.load(self._load_targets(), param, loaded_weight, shard_id, expert_id,
                                      transposed=transposed)
        except (ValueError, TypeError, LoadError) as exc:
            if type(exc) not in _RENAMED:
                raise
            named = f" (checkpoint tensor {weight_name!r})" if weight_name is not None else ""
            raise type(exc)(f"{exc}{named}; this weight_loader call wrote nothing") from None
        return copied if return_success else None

    def _check_load(self, param, loaded_weight: torch.Tensor, shard_id=None, expert_id=None, *,
                    transposed: bool | None = None, values: bool = True) -> Piece:
        """Every check of ``weight_loader(param, loaded_weight, shard_id, expert_id, transposed=...)``, writing
        nothing (the first half of a checkpoint-level all-or-nothing load; ``values=False``: shapes only)."""
        return self.loader.check(self._load_targets(), param, loaded_weight, shard_id, expert_id,
                                 transposed=transposed, values=values)

    @torch.no_grad()
    def _write_load(self, piece: Piece, loaded_weight: torch.Tensor) -> bool:
        """Write a piece ``_check_load`` accepted (the second half)."""
        return self.loader.write(self._load_targets(), piece, loaded_weight)

    def _load_targets(self) -> LoadTargets:
        return LoadTargets({n: getattr(self, n) for n in _TARGETS}, self.full_precision, self.physical_ids)

    @torch.no_grad()
    def load_weights(self, w13: torch.Tensor, w2: torch.Tensor, *, w13_bias: torch.Tensor | None = None,
                     w2_bias: torch.Tensor | None = None, e_score_correction_bias: torch.Tensor | None = None,
                     finalize: bool = True) -> None:
        """Load whole fused tensors (w13 [E, N1, H], w2 [E, H, I], biases [E, N1] / [E, H], correction
        bias [E]) through the streaming loader, then ``finalize_loading`` (also a reload when loaded).

        All or nothing: every tensor is checked (shapes, dtypes, NaN/Inf) before the first is written, and a
        reload that ``finalize_loading`` would refuse as incomplete is refused before writing."""
        calls = [(self.w13_weight, w13, None, None), (self.w2_weight, w2, "w2", None)]
        for param, t, shard in ((self.w13_bias, w13_bias, None), (self.w2_bias, w2_bias, "w2"),
                                (self.e_score_correction_bias, e_score_correction_bias, None)):
            if t is not None:
                calls.append((param, t, shard, None))
        targets = self._load_targets()
        pieces = self.loader.check_many(targets, calls)
        if finalize:
            problem = self.loader.streamer.reload_problem([k for p in pieces for k in p.all_keys])
            if problem is not None:
                raise LoadError(f"{self._where()}: load_weights: {problem}; nothing was written")
        for piece, (_, t, _, _) in zip(pieces, calls):
            self.loader.write(targets, piece, t)
        if finalize:
            self.finalize_loading()

    def finalize_loading(self, *, strict_reload: bool = True) -> str:
        """Close the load round: ``"loaded"``, ``"reloaded"`` or ``"unchanged"``; raises ``LoadError``
        naming every missing (expert, shard). Prefer ``torch_moe_ops.finalize_loading(model)``."""
        result = self.loader.finalize(strict_reload=strict_reload)
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        if meta:
            raise LoadError(f"{self._where()}: parameters still on the meta device after loading: {meta}")
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` of a saved (possibly quantized) ``FusedMoE`` state counts as a complete load. A
        state of another storage dtype is refused before anything of the layer is written."""
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        problems = self._state_dict_problems(state_dict, prefix, assign)
        if problems:
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._after_state_dict(assign)
        names = [n for n, p in self._parameters.items() if p is not None]
        if not error_msgs and all(prefix + n in state_dict for n in names):
            self.loader.streamer.mark_loaded()

    # ---------------------------------------------------------------------------------------- state
    @property
    def load_state(self) -> str:
        """``fresh`` | ``loading`` | ``loaded`` | ``reloading`` | ``torn`` (see ``loading/streamer.py``)."""
        return self.loader.streamer.status

    @property
    def is_loaded(self) -> bool:  # a complete, untorn set is in place (finalize_loading accepted it)
        return self.loader.streamer.loaded

    @property
    def is_torn(self) -> bool:  # a reload failed after writing: forward refuses until a complete reload
        return self.loader.streamer.torn

    @property
    def load_rounds(self) -> int:  # completed load / reload rounds (a reload that received nothing: none)
        return self.loader.streamer.rounds

    @property
    def peak_staging_bytes(self) -> int:  # high-water mark of this layer's full-precision staging
        return self.loader.streamer.peak_staging_bytes

    @property
    def staging_bytes(self) -> int:  # full-precision staging alive now; 0 after a complete load
        return self.loader.streamer.staging_bytes

    @property
    def expert_nbytes(self) -> int:  # one local expert's full-precision w13 + w2 in params_dtype
        return self.loader.layout.expert_nbytes

    def missing_weights(self) -> list[tuple]:
        """``(param, local expert, shard)`` pieces not yet received in the current load (or reload) round."""
        return self.loader.streamer.missing()
