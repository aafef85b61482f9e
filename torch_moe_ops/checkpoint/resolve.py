"""Checkpoint names -> what they fill in a model (docs/design.md §11), decided from names alone.

``Resolver(model, layers)`` takes the model and its ``FusedMoE`` layers by module path (found by the
caller: nothing here imports the layer) and turns each checkpoint name into an ``Action``: the
``weight_loader`` calls of an expert tensor (one per physical replica of its logical expert), a model
tensor outside the layers (router, shared experts), or a reason to ignore it.

``P`` is matched to a ``FusedMoE`` by module path (``P.experts`` or ``P``, either one a dotted suffix of
the other), then by layer index (``layers.{L}``), then, when the model has a single ``FusedMoE``, to it.

Layouts come from knowledge, not from shapes (``layouts.py``): a per-expert weight is an ``nn.Linear``
``[out, in]`` (``transposed=False``); a fused all-experts weight takes the model type's orientation, and
when the model type is unknown a square (ambiguous) one is refused before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import nn

from ..errors import LoadError
from ..layer.loading.checks import check_finite, check_materialized
from ..layer.loading.keys import describe
from .formats import mxfp4_packed
from .layouts import FORMATS, correction_bias_prefix, fused_transposed
from .names import BLOCK_CHILD_RE, LAYER_INDEX_RE, parse_expert_name


@dataclass(frozen=True)
class Action:
    """What one checkpoint tensor does. calls: ``(param, shard_id, expert_id)`` of the layer at ``path``;
    or target: the model tensor ``target_name`` outside every FusedMoE; or ignored: why it is not loaded.
    transposed: the layout of an expert weight (``weight_loader``'s; None: inferred from a non-square shape).
    ambiguous: why a square fused weight cannot be placed (set when its model type is unknown). layout_of:
    the model type that set ``transposed`` of a fused weight (named when the shape contradicts it). view: how
    the checkpoint tensor becomes what the calls take (Ernie's ``[1, E]`` correction bias -> ``[E]``)."""

    name: str
    path: str | None = None
    layer: object = None
    calls: tuple = ()
    target_name: str | None = None
    target: torch.Tensor | None = None
    ignored: str | None = None
    transposed: bool | None = None
    ambiguous: str | None = None
    layout_of: str | None = None
    view: Callable[[torch.Tensor], torch.Tensor] | None = None

    def prepared(self, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor as the calls take it (every pass and the write use this)."""
        return tensor if self.view is None else self.view(tensor)

    def check(self, tensor: torch.Tensor, origin=None, *, values: bool = True) -> list:
        """Every check of this tensor (``values=False``: names, shapes and dtypes only, so ``tensor`` may be a
        meta tensor read from a file header); returns the layer's pieces, one per ``weight_loader`` call.
        Writes nothing."""
        if self.ignored is not None:
            return []
        where = describe_tensor(self.name, origin)
        if self.target is None:
            t = self.prepared(tensor)
            if self.ambiguous is not None and t.dim() == 3 and t.shape[1] == t.shape[2]:
                raise ValueError(f"{where}: {self.ambiguous}")
            try:
                return [self.layer._check_load(p, t, s, e, transposed=self.transposed, values=values)
                        for p, s, e in self.calls]
            except ValueError as exc:
                self._check_layout(t, where, exc)
                raise
        target = self.target
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: shape {list(tensor.shape)} does not match {self.target_name} "
                             f"{list(target.shape)}")
        prequantized = tensor.element_size() == 1 < target.element_size()  # fp8 / int8 into a wider float
        if target.is_floating_point() != tensor.is_floating_point() or (target.is_floating_point() and prequantized):
            raise TypeError(f"{where}: dtype {tensor.dtype} cannot fill {self.target_name} ({target.dtype})")
        if values:
            self.check_values([], tensor, origin)
        return []

    def _check_layout(self, t: torch.Tensor, where: str, exc: ValueError) -> None:
        """A fused weight whose shape fits only the other orientation than its model type's: say so (a checkpoint
        of another model type, or a wrong ``model_type``), rather than only that the shape is wrong."""
        if self.layout_of is None:
            return
        try:
            for p, s, e in self.calls:
                self.layer._check_load(p, t, s, e, transposed=not self.transposed, values=False)
        except (ValueError, TypeError, LoadError):
            return  # wrong in both orientations: the loader's own message stands
        mine, other = ("[E, in, out]", "[E, out, in]") if self.transposed else ("[E, out, in]", "[E, in, out]")
        raise ValueError(f"{where}: shape {list(t.shape)} is the {other} layout, but model type {self.layout_of!r} "
                         f"stores fused experts {mine}: a checkpoint of another model type? pass the checkpoint's "
                         f"own, load_checkpoint(..., model_type=...) ({exc})") from None

    def check_values(self, pieces: list, tensor: torch.Tensor, origin=None) -> None:
        """The data checks of a checked tensor: no meta tensor, no NaN/Inf where it is written."""
        tensor = self.prepared(tensor)
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

    def add(self, action: Action, pieces: list, origin=None) -> None:
        """Record the pieces of ``action`` (read from file ``origin``): each key maps to the tensor's
        description (``describe_tensor``), which later messages quote."""
        new = [key for piece in pieces for key in piece.all_keys]  # none for another rank's experts
        if not new:
            return
        keys = self.by_layer.setdefault(action.path, {})
        this = describe_tensor(action.name, origin)
        for key in new:
            if key in keys:
                raise LoadError(f"{action.path}: {describe(key)} is given twice, by {keys[key]} and {this}")
            keys[key] = this


class Resolver:
    """model_type: decides the layout of fused expert weights (``layouts.FORMATS``); None or unknown:
    non-square ones are inferred from their shape, square ones are refused."""

    def __init__(self, model: nn.Module, layers: dict, model_type: str | None = None):
        self.model = model
        self.layers = layers
        self.model_type = model_type
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self._cache: dict[str, tuple | None] = {}
        #: tensors a FusedMoE owns (not its shared_experts): filled only through its weight_loader
        self.moe_owned = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}

    # -------------------------------------------------------------------------------------- actions
    def action(self, name: str) -> Action:
        parsed = parse_expert_name(name)
        if parsed is not None:
            return self._oriented(self._expert(name, parsed), parsed)
        if (hit := self._correction_layer(name)) is not None:
            return Action(name, hit[0], hit[1], (("e_score_correction_bias", None, None),), view=_one_group)
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
        if parsed.kind == "input_scale":
            return Action(name, ignored="a static activation scale: torch_moe_ops quantizes activations dynamically "
                                        "(per token, or per 1 x block_k group), so it is not used")
        try:
            shard = parsed.shard(layer.gated)
        except KeyError:
            return Action(name, ignored=f"non-gated activation {layer.activation!r} has no gate projection")
        target = parsed.target(shard)
        # a weight scale is never ignored: without a quant config its weight_loader call names the mismatch
        if getattr(layer, target) is None and parsed.kind not in ("scale", "mxfp4_scale"):
            return Action(name, ignored=f"{path} has no {target} (has_bias=False)")
        if parsed.kind == "mxfp4":  # GPT-OSS's packed [E, N, K/32, 16] bytes: [E, N, K/2], already [out, in]
            return Action(name, path, layer, ((target, shard, None),), transposed=False,
                          view=partial(mxfp4_packed, dims=3))
        if parsed.expert is None:
            return Action(name, path, layer, ((target, shard, None),))
        # checkpoint names address logical experts: fill every physical replica (those on this rank)
        return Action(name, path, layer, tuple((target, shard, p) for p in layer.physical_ids(parsed.expert)))

    def _oriented(self, action: Action, parsed) -> Action:
        """An expert weight's layout from knowledge: per expert ``[out, in]``, fused the model type's."""
        if (action.ignored is not None or parsed.bias or parsed.kind.startswith("mxfp4")
                or not (parsed.expert is None or action.name.endswith(".weight"))):
            return action
        if parsed.expert is not None:
            return replace(action, transposed=False)  # an nn.Linear weight
        transposed = fused_transposed(self.model_type)
        if transposed is not None:
            return replace(action, transposed=transposed, layout_of=self.model_type)
        known = (f"model type {self.model_type!r} has no known expert layout" if self.model_type else
                 "the model type is unknown")
        return replace(action, ambiguous=(
            f"square experts, so [E, out, in] and the transposed [E, in, out] have the same shape, and {known}; "
            f"pass load_checkpoint(..., model_type=...) (one of {sorted(FORMATS)})"))

    def _correction_layer(self, name: str):
        """The ``FusedMoE`` that owns ``P.{gate|moe_statics|gate.moe_statics}.e_score_correction_bias``, unless
        the model names another home."""
        prefix = correction_bias_prefix(name)
        if prefix is None:
            return None
        direct = self.exact(name)
        if direct is not None and not any(direct[1] is layer.e_score_correction_bias for layer in self.layers.values()):
            return None
        hit = self.layer(prefix)
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


def _one_group(t: torch.Tensor) -> torch.Tensor:
    """Ernie's ``[1, E]`` correction bias (one expert group) as ``[E]``; any other shape is left for the
    loader's shape check to name."""
    return t[0] if t.dim() == 2 and t.shape[0] == 1 else t


def _is_suffix(short: list[str], long: list[str]) -> bool:
    return 0 < len(short) <= len(long) and long[-len(short):] == short


__all__ = ["Action", "Given", "Resolver", "describe_tensor"]
