"""The loading half of ``FusedMoE``'s API (docs/design.md §10, §11): ``weight_loader``'s two calling
conventions, the tensors a load call writes (``LoadTargets``) and the all-or-nothing ``load_weights``.

The layer's methods (``weight_loader``, ``load_weights``, ``finalize_loading``, ...) call these with its
``loading.WeightLoader`` (``layer.loader``) and its tensors; nothing here reads the layer.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import LoadError, TornWeightsError
from .loading import LOADABLE, WEIGHTS, LoadTargets, WeightLoader

#: ``weight_loader``'s third positional argument is a shard id when it is one of these (or None)
SHARD_IDS = ("w1", "w2", "w3", "w13")
UNSET = object()  # shard_id / expert_id not given by keyword
_RENAMED = (ValueError, TypeError, LoadError, TornWeightsError)  # errors re-raised naming the checkpoint tensor


def targets(params: Mapping, full_precision: Mapping, physical_ids: Callable[[int], list[int]]) -> LoadTargets:
    """The layer's current tensors as a load call's ``LoadTargets``: what it may write (``LOADABLE``: the
    weights, their scales, biases, the routing bias; None where absent) from ``params``, its ``_parameters``."""
    return LoadTargets({n: params.get(n) for n in LOADABLE}, full_precision, physical_ids)


def convention(where: Callable[[], str], args: tuple, weight_name, shard_id, expert_id, return_success):
    """``weight_loader``'s positional ``args`` (after ``loaded_weight``) and keywords -> (weight_name, shard_id,
    expert_id, return_success).

    The third positional argument decides: None or a shard id (``"w1"``, ``"w2"``, ``"w3"``, ``"w13"``) is a
    shard id, then ``expert_id`` may follow (this package's convention); any other str is the checkpoint weight
    name (e.g. ``"model.layers.0.mlp.experts.3.gate_proj.weight"``), then ``shard_id``, ``expert_id`` and
    ``return_success`` may follow (vLLM's). A weight name that equals a shard id (``"w1"``) is still read as the
    name when a shard id follows it (``shard_id=`` by keyword, or a str fourth). Anything else is a
    ``TypeError``."""
    if args and args[0] is not None and not isinstance(args[0], str):
        raise TypeError(f"{where()}: weight_loader's third argument must be a shard id {SHARD_IDS}, None, or the "
                        f"checkpoint weight name (a str, vLLM's convention), got {type(args[0]).__name__}")
    # a shard-id-like str is still vLLM's weight_name when a shard id follows it (by keyword, or next: a str)
    vllm = bool(args) and args[0] is not None and (
        args[0] not in SHARD_IDS or shard_id is not UNSET or (len(args) > 1 and isinstance(args[1], str)))
    names = ("weight_name", "shard_id", "expert_id", "return_success") if vllm else ("shard_id", "expert_id")
    if len(args) > len(names):
        raise TypeError(f"{where()}: weight_loader takes at most {len(names)} positional arguments after "
                        f"loaded_weight ({', '.join(names)}), got {len(args)}")
    given = {"weight_name": weight_name, "shard_id": shard_id, "expert_id": expert_id,
             "return_success": return_success}
    defaults = {"weight_name": None, "shard_id": UNSET, "expert_id": UNSET, "return_success": False}
    for name, value in zip(names, args):
        if given[name] is not defaults[name]:
            raise TypeError(f"{where()}: weight_loader got {name} twice (positionally and by keyword)")
        given[name] = value
    if given["weight_name"] is not None and not isinstance(given["weight_name"], str):
        raise TypeError(f"{where()}: weight_name must be a str, got {type(given['weight_name']).__name__}")
    return (given["weight_name"], None if given["shard_id"] is UNSET else given["shard_id"],
            None if given["expert_id"] is UNSET else given["expert_id"], given["return_success"])


def load_one(loader: WeightLoader, to: LoadTargets, param, loaded: torch.Tensor, shard_id, expert_id,
             weight_name: str | None, transposed: bool | None) -> bool:
    """One ``weight_loader`` call: checked in full, then written; an error names ``weight_name`` (the
    checkpoint tensor) and says that nothing was written. True when something was copied."""
    try:
        return loader.load(to, param, loaded, shard_id, expert_id, transposed=transposed)
    except (ValueError, TypeError, LoadError) as exc:
        if type(exc) not in _RENAMED:
            raise
        named = f" (checkpoint tensor {weight_name!r})" if weight_name is not None else ""
        raise type(exc)(f"{exc}{named}; this weight_loader call wrote nothing") from None


def load_all(loader: WeightLoader, to: LoadTargets, tensors: Mapping[str, torch.Tensor | None], *, reload_check: bool,
             where: Callable[[], str]) -> None:
    """``load_weights``' writes: whole fused tensors by parameter name (w13_weight [E, N1, H], w2_weight
    [E, H, I], w13_bias [E, N1], w2_bias [E, H], e_score_correction_bias [E]; a None bias: not given), all or
    nothing.
    Every tensor is checked (shapes, dtypes, NaN/Inf) before the first is written; ``reload_check``: also
    refuse, before writing, a reload that ``finalize_loading`` would refuse as incomplete."""
    calls = [(to.params[name], t, "w2" if name.startswith("w2") else None, None)
             for name, t in tensors.items() if t is not None or name in WEIGHTS]
    pieces = loader.check_many(to, calls)
    if reload_check:
        problem = loader.streamer.reload_problem([k for p in pieces for k in p.all_keys])
        if problem is not None:
            raise LoadError(f"{where()}: load_weights: {problem}; nothing was written")
    for piece, (_, t, _, _) in zip(pieces, calls):
        loader.write(to, piece, t)


__all__ = ["SHARD_IDS", "UNSET", "convention", "load_all", "load_one", "targets"]
