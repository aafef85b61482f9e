"""Checkpoint names -> what they fill in a model (docs/design.md §11), decided from names alone.

``Resolver(model, layers)`` takes the model and its ``FusedMoE`` layers by module path (found by the
caller: nothing here imports the layer) and turns each checkpoint name into an ``Action``: the
``weight_loader`` calls of an expert tensor (one per physical replica of its logical expert), a model
tensor outside the layers (router, shared experts), or a reason to ignore it.

``P`` is matched to a ``FusedMoE`` by module path (``P.experts`` or ``P``, either one a dotted suffix of
the other), then by layer index (``layers.{L}``), then, when the model has a single ``FusedMoE``, to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoadError
from .checks import check_finite, check_materialized
from .names import BLOCK_CHILD_RE, LAYER_INDEX_RE, parse_expert_name
from .streamer import describe


@dataclass(frozen=True)
class Action:
    """What one checkpoint tensor does. calls: ``(param, shard_id, expert_id)`` of the layer at ``path``;
    or target: the model tensor ``target_name`` outside every FusedMoE; or ignored: why it is not loaded."""

    name: str
    path: str | None = None
    layer: object = None
    calls: tuple = ()
    target_name: str | None = None
    target: torch.Tensor | None = None
    ignored: str | None = None

    def check(self, tensor: torch.Tensor, origin=None, *, values: bool = True) -> list:
        """Every check of this tensor (``values=False``: names, shapes and dtypes only, so ``tensor`` may be a
        meta tensor read from a file header); returns the layer's pieces, one per ``weight_loader`` call.
        Writes nothing."""
        if self.ignored is not None:
            return []
        if self.target is None:
            return [self.layer._check_load(p, tensor, s, e, values=values) for p, s, e in self.calls]
        target, where = self.target, describe_tensor(self.name, origin)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: shape {list(tensor.shape)} does not match {self.target_name} "
                             f"{list(target.shape)}")
        prequantized = tensor.element_size() == 1 < target.element_size()  # fp8 / int8 into a wider float
        if target.is_floating_point() != tensor.is_floating_point() or (target.is_floating_point() and prequantized):
            raise TypeError(f"{where}: dtype {tensor.dtype} cannot fill {self.target_name} ({target.dtype})")
        if values:
            self.check_values([], tensor, origin)
        return []

    def check_values(self, pieces: list, tensor: torch.Tensor, origin=None) -> None:
        """The data checks of a checked tensor: no meta tensor, no NaN/Inf where it is written."""
        if self.target is not None:
            where = describe_tensor(self.name, origin)
            check_materialized(tensor, where)
            if isinstance(self.target, nn.Parameter):  # buffers (masks) may hold inf on purpose
                check_finite(tensor, f"{where} -> {self.target_name}")
        for piece in pieces:
            self.layer.loader.check_values(piece, tensor)


def describe_tensor(name: str, origin=None) -> str:
    return f"checkpoint tensor {name!r}" + (f" ({origin})" if origin else "")


class Given:
    """Pieces a source gives, per layer path: a piece given twice is an error (nothing is written)."""

    def __init__(self):
        self.by_layer: dict[str, dict] = {}

    def add(self, action: Action, pieces: list) -> None:
        new = [key for piece in pieces for key in piece.all_keys]  # none for another rank's experts
        if not new:
            return
        keys = self.by_layer.setdefault(action.path, {})
        for key in new:
            if key in keys:
                raise LoadError(f"{action.path}: {describe(key)} is given twice, by {keys[key]!r} and {action.name!r}")
            keys[key] = action.name


class Resolver:
    def __init__(self, model: nn.Module, layers: dict):
        self.model = model
        self.layers = layers
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self._cache: dict[str, tuple | None] = {}
        #: tensors a FusedMoE owns (not its shared_experts): filled only through its weight_loader
        self.moe_owned = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}

    # -------------------------------------------------------------------------------------- actions
    def action(self, name: str) -> Action:
        parsed = parse_expert_name(name)
        if parsed is not None:
            return self._expert(name, parsed)
        if name.endswith(".e_score_correction_bias") and (hit := self._correction_layer(name)) is not None:
            return Action(name, hit[0], hit[1], (("e_score_correction_bias", None, None),))
        found = self.tensor(name)
        if found is None:
            return Action(name, ignored="no matching parameter or buffer in the model")
        target_name, target = found
        if id(target) in self.moe_owned:
            return Action(name, ignored=f"{target_name} belongs to a FusedMoE and is filled by its weight_loader "
                                        "(a quantized state dict loads with model.load_state_dict)")
        if target.is_meta:
            return Action(name, ignored=f"{target_name} is on the meta device")
        return Action(name, target_name=target_name, target=target)

    def _expert(self, name: str, parsed) -> Action:
        hit = self.layer(parsed.prefix)
        if hit is None:
            return Action(name, ignored="no FusedMoE in the model matches this layer")
        path, layer = hit
        try:
            shard = parsed.shard(layer.gated)
        except KeyError:
            return Action(name, ignored=f"non-gated activation {layer.activation!r} has no gate projection")
        target = parsed.target(shard)
        if getattr(layer, target) is None:
            return Action(name, ignored=f"{path} has no {target} (has_bias=False)")
        if parsed.expert is None:
            return Action(name, path, layer, ((target, shard, None),))
        # checkpoint names address logical experts: fill every physical replica (those on this rank)
        return Action(name, path, layer, tuple((target, shard, p) for p in layer.physical_ids(parsed.expert)))

    def _correction_layer(self, name: str):
        """The ``FusedMoE`` that owns ``P.gate.e_score_correction_bias``, unless the model names another home."""
        m = BLOCK_CHILD_RE.match(name)
        if m is None or m["child"] != "gate":
            return None
        direct = self.exact(name)
        if direct is not None and not any(direct[1] is layer.e_score_correction_bias for layer in self.layers.values()):
            return None
        hit = self.layer(m["prefix"])
        return hit if hit is not None and hit[1].use_correction_bias else None

    # -------------------------------------------------------------------------------------- lookup
    def layer(self, prefix: str) -> tuple | None:
        if prefix not in self._cache:
            self._cache[prefix] = self._find_layer(prefix)
        return self._cache[prefix]

    def _find_layer(self, prefix: str):
        for cand in (prefix + ".experts", prefix):
            if cand in self.layers:
                return cand, self.layers[cand]
        for cand in (prefix + ".experts", prefix):
            c = cand.split(".")
            hits = [p for p in self.layers if p and (_is_suffix(p.split("."), c) or _is_suffix(c, p.split(".")))]
            if len(hits) == 1:
                return hits[0], self.layers[hits[0]]
        index = LAYER_INDEX_RE.findall(prefix)
        if index:
            hits = [p for p in self.layers if index[-1] in LAYER_INDEX_RE.findall(p)[-1:]]
            if len(hits) == 1:
                return hits[0], self.layers[hits[0]]
        if len(self.layers) == 1:
            return next(iter(self.layers.items()))
        return None

    def exact(self, name: str) -> tuple[str, torch.Tensor] | None:
        """The model tensor named ``name`` (also with a leading ``model.`` added or removed)."""
        for cand in (name, name.removeprefix("model."), "model." + name):
            if cand in self.tensors:
                return cand, self.tensors[cand]
        return None

    def tensor(self, name: str) -> tuple[str, torch.Tensor] | None:
        """``exact(name)``, else a ``gate`` / ``shared_expert*`` child of an MoE block, looked up as a sibling
        of the matched ``FusedMoE`` or inside it."""
        found = self.exact(name)
        m = None if found else BLOCK_CHILD_RE.match(name)
        if m is None or (hit := self.layer(m["prefix"])) is None:
            return found
        path = hit[0]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        child = m["child"]
        children = [child, "shared_experts", "shared_expert"] if child in ("shared_expert", "shared_experts") else [child]
        for base in (parent, path):
            for c in children:
                cand = ".".join(p for p in (base, c, m["rest"]) if p)
                if cand in self.tensors:
                    return cand, self.tensors[cand]
        return None


def _is_suffix(short: list[str], long: list[str]) -> bool:
    return 0 < len(short) <= len(long) and long[-len(short):] == short


__all__ = ["Action", "Given", "Resolver", "describe_tensor"]
