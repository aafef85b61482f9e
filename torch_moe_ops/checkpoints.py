"""Checkpoint loading for models that contain ``FusedMoE`` layers (docs/design.md §10, §11).

- ``load_checkpoint(model, source)``: maps Hugging Face names onto every ``FusedMoE`` (streaming, expert by
  expert) and onto the model's other parameters; returns a ``LoadReport``.
- ``finalize_loading(model)``: closes the load; raises listing every missing (layer, expert, shard).
- ``reload_weights(model, source)``: RL weight sync into the same storage (every ``data_ptr`` kept).

Expert names are parsed by ``loading/names.py``. ``P.gate.e_score_correction_bias`` fills
``FusedMoE.e_score_correction_bias`` (if the layer has one); ``P.gate.weight`` (router),
``P.shared_expert(s).*``, ``P.shared_expert_gate.*`` and any other name fill the model parameter or buffer
of that name (with or without a leading ``model.``), else the ``gate`` / ``shared_expert*`` sibling of the
matched ``FusedMoE`` (or inside it), else they are reported as ignored.

``P`` is matched to a ``FusedMoE`` by module path (``P.experts`` or ``P``, either one a dotted suffix of
the other), then by layer index (``layers.{L}``), then, when the model has a single ``FusedMoE``, to it.
This module sits above ``layer.py`` (it needs ``FusedMoE``); ``loading/`` sits below it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LoadError
from .layer import FusedMoE
from .loading.names import BLOCK_CHILD_RE, LAYER_INDEX_RE, parse_expert_name
from .loading.sources import iter_checkpoint


@dataclass
class LoadReport:
    """What ``load_checkpoint`` / ``reload_weights`` did with each checkpoint tensor."""

    loaded: list[str] = field(default_factory=list)  #: checkpoint names that were loaded
    ignored: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> why it was not loaded
    layers: dict[str, int] = field(default_factory=dict)  #: FusedMoE path -> tensors loaded into it
    other: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> model parameter it filled
    nbytes: int = 0  #: bytes of checkpoint data loaded
    layer_status: dict[str, str] = field(default_factory=dict)  #: after finalize: loaded|reloaded|unchanged

    def __str__(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors ({self.nbytes / 2**20:.1f} MiB): "
                f"{sum(self.layers.values())} into {len(self.layers)} FusedMoE layers, {len(self.other)} into other "
                f"parameters; ignored {len(self.ignored)}")
        if self.ignored:
            shown = list(self.ignored.items())[:10]
            text += ": " + "; ".join(f"{n} ({why})" for n, why in shown) + (" ..." if len(self.ignored) > 10 else "")
        return text


# ------------------------------------------------------------------------------------------ resolution
class _Resolver:
    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = name_layers(model)
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self._cache: dict[str, tuple[str, FusedMoE] | None] = {}
        #: tensors a FusedMoE owns (not its shared_experts): filled only through its weight_loader
        self.moe_owned = {id(p) for layer in self.layers.values() for p in layer.parameters(recurse=False)}

    def layer(self, prefix: str) -> tuple[str, FusedMoE] | None:
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


def name_layers(model: nn.Module) -> dict[str, FusedMoE]:
    """Every ``FusedMoE`` in ``model`` by module path; sets ``layer.layer_name`` for error messages."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, FusedMoE):
            module.layer_name = path or type(model).__name__
            layers[path] = module
    return layers


# ------------------------------------------------------------------------------------------ loading
def _load_expert_tensor(res: _Resolver, name: str, parsed, tensor: torch.Tensor, report: LoadReport) -> bool:
    """Route one parsed expert tensor to its layer; False (and a reason in ``report``) when it is ignored."""
    hit = res.layer(parsed.prefix)
    if hit is None:
        report.ignored[name] = "no FusedMoE in the model matches this layer"
        return False
    path, layer = hit
    try:
        shard = parsed.shard(layer.gated)
    except KeyError:
        report.ignored[name] = f"non-gated activation {layer.activation!r} has no gate projection"
        return False
    target = parsed.target(shard)
    if getattr(layer, target) is None:
        report.ignored[name] = f"{path} has no {target} (has_bias=False)"
        return False
    if parsed.expert is None:
        layer.weight_loader(target, tensor, shard, None, weight_name=name)
    else:  # checkpoint names address logical experts: fill every physical replica (those on this rank)
        for p in layer.physical_ids(parsed.expert):
            layer.weight_loader(target, tensor, shard, p, weight_name=name)
    report.layers[path] = report.layers.get(path, 0) + 1
    return True


def _load_other(res: _Resolver, name: str, tensor: torch.Tensor, report: LoadReport) -> bool:
    found = res.tensor(name)
    if found is None:
        report.ignored[name] = "no matching parameter or buffer in the model"
        return False
    target_name, target = found
    if id(target) in res.moe_owned:
        report.ignored[name] = (f"{target_name} belongs to a FusedMoE and is filled by its weight_loader "
                                "(a quantized state dict loads with model.load_state_dict)")
        return False
    if target.is_meta:
        report.ignored[name] = f"{target_name} is on the meta device"
        return False
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {name}: shape {list(tensor.shape)} does not match {target_name} "
                         f"{list(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor)
    report.other[name] = target_name
    return True


def _load_one(res: _Resolver, name: str, tensor: torch.Tensor, report: LoadReport) -> None:
    parsed = parse_expert_name(name)
    if parsed is not None:
        ok = _load_expert_tensor(res, name, parsed, tensor, report)
    elif name.endswith(".e_score_correction_bias") and (hit := _correction_layer(res, name)) is not None:
        path, layer = hit
        layer.weight_loader("e_score_correction_bias", tensor, None, None, weight_name=name)
        report.layers[path] = report.layers.get(path, 0) + 1
        ok = True
    else:
        ok = _load_other(res, name, tensor, report)
    if ok:
        report.loaded.append(name)
        report.nbytes += tensor.numel() * tensor.element_size()


def _correction_layer(res: _Resolver, name: str):
    """The ``FusedMoE`` that owns ``P.gate.e_score_correction_bias``, unless the model names another home."""
    m = BLOCK_CHILD_RE.match(name)
    if m is None or m["child"] != "gate":
        return None
    direct = res.exact(name)
    if direct is not None and not any(direct[1] is layer.e_score_correction_bias for layer in res.layers.values()):
        return None
    hit = res.layer(m["prefix"])
    return hit if hit is not None and hit[1].use_correction_bias else None


def load_checkpoint(model: nn.Module, source, *, progress: bool = True) -> LoadReport:
    """Load a checkpoint into ``model`` (its ``FusedMoE`` layers stream and quantize expert by expert).

    Args:
        model: an ``nn.Module`` containing one or more ``FusedMoE`` (or a ``FusedMoE`` itself).
        source: a folder of ``.safetensors`` files, one ``.safetensors`` file, a dict ``name -> tensor``, or an
            iterable of ``(name, tensor)`` pairs (e.g. weights streamed from a trainer).
        progress: show a tqdm progress bar.

    Returns:
        ``LoadReport``: loaded names, ignored names with reasons, tensors per layer, bytes. Does not finalize:
        call ``finalize_loading(model)`` after the last source. A shape mismatch, a tensor loaded twice or an
        unusable dtype raises at once, naming the parameter, expert and shard.
    """
    from tqdm.auto import tqdm

    res = _Resolver(model)
    if not res.layers:
        raise ValueError(f"{type(model).__name__} contains no torch_moe_ops.FusedMoE")
    items, total = iter_checkpoint(source)
    report = LoadReport()
    with tqdm(items, total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for name, tensor in bar:
            _load_one(res, name, tensor, report)
            del tensor
    return report


def finalize_loading(model: nn.Module, *, strict_reload: bool = True) -> dict[str, str]:
    """Close the load (or reload) round of every ``FusedMoE`` in ``model``.

    Raises ``LoadError`` listing every missing (layer, expert, shard) across all layers; a layer that raised
    keeps its state (``layer.is_loaded`` stays False on a first load, and its forward refuses to run).
    Afterwards checks that no parameter of ``model`` is on the meta device.

    Returns:
        ``{layer path: "loaded" | "reloaded" | "unchanged"}``.
    """
    layers = name_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no torch_moe_ops.FusedMoE")
    status, errors = {}, []
    for path, layer in layers.items():
        try:
            status[path] = layer.finalize_loading(strict_reload=strict_reload)
        except LoadError as exc:
            errors.append(str(exc))
    if errors:
        raise LoadError(f"{len(errors)} of {len(layers)} FusedMoE layers are incomplete:\n  " + "\n  ".join(errors))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LoadError(f"parameters still on the meta device after loading: {meta}")
    return status


def reload_weights(model: nn.Module, source, *, progress: bool = False, strict: bool = True) -> LoadReport:
    """Reload weights into a finalized model in place (RL weight sync), expert by expert.

    Every parameter keeps its ``data_ptr`` (each expert is re-quantized straight into its slot with
    ``quantize_weight_into``), so compiled models and captured CUDA graphs see the new weights. Extra
    memory is the same as a streaming load: one expert's staging. ``strict``: a layer that received some
    weights must receive all of them (otherwise ``LoadError``); a layer that received none keeps its
    weights and a warning names it.
    """
    layers = name_layers(model)
    not_loaded = [p for p, layer in layers.items() if not layer.is_loaded]
    if not_loaded:
        raise LoadError(f"reload_weights needs finalized layers; not loaded yet: {not_loaded} "
                        "(use load_checkpoint + finalize_loading first)")
    rounds = {p: layer.load_rounds for p, layer in layers.items()}
    report = load_checkpoint(model, source, progress=progress)
    status = finalize_loading(model, strict_reload=strict)
    for path, layer in layers.items():
        status[path] = "reloaded" if layer.load_rounds > rounds[path] else "unchanged"
    unchanged = [p for p, s in status.items() if s == "unchanged"]
    if unchanged:
        warnings.warn(f"reload_weights: no weights for {unchanged}; they keep their previous weights", stacklevel=2)
    report.layer_status = status
    return report


__all__ = ["LoadReport", "finalize_loading", "iter_checkpoint", "load_checkpoint", "name_layers", "reload_weights"]
