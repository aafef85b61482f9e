"""Checkpoint loading for models that contain ``FusedMoE`` layers (docs/design.md §10, §11).

- ``load_checkpoint(model, source)``: maps Hugging Face names onto every ``FusedMoE`` (streaming, expert by
  expert) and onto the model's other parameters; returns a ``LoadReport``.
- ``finalize_loading(model)``: closes the load; raises listing every missing (layer, expert, shard).
- ``reload_weights(model, source)``: RL weight sync into the same storage (every ``data_ptr`` kept).

Names resolve through ``loading/resolve.py`` (``P.experts.{e}.*`` and fused expert tensors, the correction
bias, the router and shared experts, anything else by its model name); the layout of fused expert tensors
comes from the model type (``loading/formats.py``): the ``model_type`` argument, else ``model.config``, else
the ``config.json`` next to a safetensors folder.

**All or nothing** (docs/online-quantization.md, "Failed loads"). A source that can be read again (a dict,
a list, a safetensors folder) is checked in full before the first write: names, shapes, dtypes and pieces
given twice (a folder: from the file headers, no data read), then every tensor's values (no meta tensor,
no NaN/Inf; a folder: one more read, tensor by tensor), then, for a reload, that every layer it touches
gets a complete set. Any failure raises before anything is written. A one-shot iterator is checked tensor
by tensor; if it fails after writing, the layers it wrote into are torn (forward refuses) until a later
complete reload. This module sits above ``layer.py`` (it needs ``FusedMoE``); ``loading/`` sits below it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LoadError, TornWeightsError
from .layer import FusedMoE
from .loading.progress import counted, progress_bar
from .loading.resolve import Action, Given, Resolver, describe_tensor
from .loading.sources import iter_checkpoint, model_type_for, open_source


@dataclass
class LoadReport:
    """What ``load_checkpoint`` / ``reload_weights`` did with each checkpoint tensor."""

    loaded: list[str] = field(default_factory=list)  #: checkpoint names that were loaded
    ignored: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> why it was not loaded
    layers: dict[str, int] = field(default_factory=dict)  #: FusedMoE path -> tensors loaded into it
    other: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> model parameter it filled
    nbytes: int = 0  #: bytes of checkpoint data loaded
    layer_status: dict[str, str] = field(default_factory=dict)  #: after finalize: loaded|reloaded|unchanged
    ignored_files: dict[str, str] = field(default_factory=dict)  #: file of a folder that was not read -> why
    model_type: str | None = None  #: the model type that decided the expert layouts (None: unknown)

    def __str__(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors ({self.nbytes / 2**20:.1f} MiB): "
                f"{sum(self.layers.values())} into {len(self.layers)} FusedMoE layers, {len(self.other)} into other "
                f"parameters; ignored {len(self.ignored)}")
        if self.ignored:
            shown = list(self.ignored.items())[:10]
            text += ": " + "; ".join(f"{n} ({why})" for n, why in shown) + (" ..." if len(self.ignored) > 10 else "")
        if self.ignored_files:
            text += "; files not read: " + "; ".join(f"{f} ({why})" for f, why in self.ignored_files.items())
        return text


def name_layers(model: nn.Module) -> dict[str, FusedMoE]:
    """Every ``FusedMoE`` in ``model`` by module path; sets ``layer.layer_name`` for error messages."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, FusedMoE):
            module.layer_name = path or type(model).__name__
            layers[path] = module
    return layers


# ------------------------------------------------------------------------------------------ passes
def _write(action: Action, pieces: list, tensor: torch.Tensor, report: LoadReport) -> None:
    if action.ignored is not None:
        report.ignored[action.name] = action.ignored
        return
    tensor = action.prepared(tensor)
    if action.target is not None:
        with torch.no_grad():
            action.target.copy_(tensor)
        report.other[action.name] = action.target_name
    else:
        for piece in pieces:
            action.layer._write_load(piece, tensor)
        report.layers[action.path] = report.layers.get(action.path, 0) + 1
    report.loaded.append(action.name)
    report.nbytes += tensor.numel() * tensor.element_size()


def _raise_in_context(exc: BaseException, where: str | None, tail: str):
    """Re-raise ``exc`` (same type) with the checkpoint tensor and what happened to the model in its message
    (other exception types, e.g. an out-of-memory error, keep their message and get a note, Python >= 3.11)."""
    if type(exc) not in (ValueError, TypeError, LoadError, TornWeightsError):
        if hasattr(exc, "add_note"):
            exc.add_note(f"while loading {where or 'the checkpoint'}{tail}")
        raise exc
    text = str(exc)
    if where is not None and not text.startswith("checkpoint tensor"):
        text = f"{where}: {text}"
    raise type(exc)(text + tail) from exc


def _check_source(res: Resolver, src, *, strict: bool, finalizing: bool, progress: bool):
    """Every check, before any write: returns ``{name: (action, pieces)}`` or raises (nothing written)."""
    plan, given = {}, Given()
    for name, tensor, origin in src.specs():
        try:
            if name in plan:
                raise LoadError("appears twice in the source")
            action = res.action(name)
            pieces = action.check(tensor, origin, values=src.in_memory)
            given.add(action, pieces, origin)
        except Exception as exc:
            _raise_in_context(exc, describe_tensor(name, origin), "; nothing was written")
        plan[name] = (action, pieces)
    if not src.in_memory:  # the values: one read of every tensor, freed before the next
        with progress_bar("Checking weights", src.nbytes(), progress) as bar:
            for name, tensor, origin in counted(src.tensors(), bar):
                try:
                    plan[name][0].check_values(plan[name][1], tensor, origin)
                except Exception as exc:
                    _raise_in_context(exc, describe_tensor(name, origin), "; nothing was written")
                del tensor
    problems = []
    for path, layer in res.layers.items():
        keys = given.by_layer.get(path)
        if keys is not None or (finalizing and layer.is_torn):
            problem = layer.loader.streamer.reload_problem(keys or (), strict=strict)
            if problem is not None:
                problems.append(f"{path}: {problem}")
    if problems:
        what = "reload would leave" if any(layer.load_rounds for layer in res.layers.values()) else "load would leave"
        raise LoadError(f"this {what} {len(problems)} FusedMoE layer(s) incomplete or mixed; nothing was "
                        "written:\n  " + "\n  ".join(problems))
    return plan


def _tear(res: Resolver, touched: set, wrote_other: bool, reason: str) -> list[str]:
    """A load failed after writing: tear the layers it wrote into (all loaded ones if it changed a tensor
    outside them). Returns their paths."""
    torn = []
    for path, layer in res.layers.items():
        streamer = layer.loader.streamer
        if path in touched or (wrote_other and streamer.loaded):
            what = f"reload round {streamer.rounds + 1}" if streamer.rounds else "the first load"
            streamer.tear(f"{what} failed: {reason}")
            torn.append(path)
    return torn


def _run(res: Resolver, items, plan, report: LoadReport, *, strict: bool) -> None:
    """The write pass (``plan`` given: checked ahead) or a one-shot stream (``plan`` None: each tensor is
    checked, then written). A failure after a write tears what was written."""
    touched, wrote_other, seen, where = set(), False, set(), "the source"
    try:
        for name, tensor, origin in items:
            where = describe_tensor(name, origin)
            if plan is None:
                if name in seen:
                    raise LoadError("appears twice in the source")
                action = res.action(name)
                pieces = action.check(tensor, origin)
            elif name in plan:
                action, pieces = plan[name]
            else:
                raise LoadError("was not in the source when it was checked (did the files change?)")
            _write(action, pieces, tensor, report)
            seen.add(name)
            if any(piece.slots for piece in pieces):
                touched.add(action.path)
            wrote_other |= action.target is not None
            del tensor
        where = None
        open_rounds = [p for p in sorted(touched) if res.layers[p].loader.streamer.state == "reloading"]
        problems = [f"{p}: {q}" for p in open_rounds
                    if (q := res.layers[p].loader.streamer.reload_problem(strict=strict)) is not None]
        if problems:
            raise LoadError("the source ended incomplete: " + "; ".join(problems))
    except BaseException as exc:
        if not (touched or wrote_other):
            _raise_in_context(exc, where, "; nothing was written")
        torn = _tear(res, touched, wrote_other, f"at {where or 'the end of the source'} after {len(seen)} "
                                                 f"tensors were written ({type(exc).__name__}: {exc})")
        _raise_in_context(exc, where, f"; {len(seen)} tensors had been written, so the layers {torn} are torn: "
                                      "their forward refuses until a later complete load")


def _load(model: nn.Module, source, *, progress: bool, strict: bool, model_type: str | None,
          finalizing: bool = False) -> LoadReport:
    layers = name_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no torch_moe_ops.FusedMoE")
    model_type = model_type_for(model_type, getattr(model, "config", None), source)
    res, src = Resolver(model, layers, model_type), open_source(source)
    report = LoadReport(ignored_files=dict(src.ignored_files), model_type=model_type)
    plan = None if src.one_shot else _check_source(res, src, strict=strict, finalizing=finalizing, progress=progress)
    with progress_bar("Loading weights", src.nbytes(), progress) as bar:
        _run(res, counted(src.tensors(), bar), plan, report, strict=strict)
    return report


# ------------------------------------------------------------------------------------------ public
def load_checkpoint(model: nn.Module, source, *, model_type: str | None = None, progress: bool = True,
                    strict: bool = True) -> LoadReport:
    """Load a checkpoint into ``model`` (its ``FusedMoE`` layers stream and quantize expert by expert).

    Args:
        model: an ``nn.Module`` containing one or more ``FusedMoE`` (or a ``FusedMoE`` itself).
        source: a folder of ``.safetensors`` files, one ``.safetensors`` file, a dict ``name -> tensor``, a list
            (or ``dict.items()``) of ``(name, tensor)`` pairs, or a one-shot iterable of pairs (a generator,
            e.g. weights streamed from a trainer). A folder: ``model.safetensors.index.json`` is respected
            (only the files it lists are read), else ``model.safetensors``, else every ``*.safetensors`` but
            Mistral's ``consolidated*``; files left out are in ``report.ignored_files``.
        model_type: the Hugging Face model type (``"gpt_oss"``, ``"mixtral"``, ...; ``loading.formats.FORMATS``)
            that says how fused ``[E, ...]`` expert tensors are laid out. Default: ``model.config.model_type``,
            else the ``config.json`` next to a folder. Unknown: a non-square fused tensor is recognised by its
            shape, a square one (GPT-OSS's down_proj, H = I) raises ``ValueError`` before anything is written.
            Per-expert ``experts.{e}.*.weight`` tensors are ``nn.Linear`` weights, ``[out, in]``, always.
        progress: show tqdm progress bars on stderr counting bytes (checking, then loading); they stay on
            screen, and refresh every 15 s when stderr is not a terminal (a log).
        strict: for a layer that is already loaded (this is a reload), a source that touches it must give it
            a complete set; False allows a subset of experts (a gate without its up is always refused).

    Returns:
        ``LoadReport``: loaded names, ignored names with reasons, tensors per layer, bytes. Does not finalize:
        call ``finalize_loading(model)`` after the last source (a first load may come from several sources).

    All or nothing: a source that can be read again is checked in full first (names, shapes, dtypes, a
    piece given twice, NaN/Inf, meta tensors, a reload's completeness; a folder's headers, then one read
    of its tensors), and any failure raises naming the tensor (and file) before anything is written. A
    one-shot iterable is checked tensor by tensor; a failure after a write tears the layers written into
    (``TornWeightsError`` from their forward) until a complete reload. A corrupt file raises ``LoadError``
    naming it.
    """
    return _load(model, source, progress=progress, strict=strict, model_type=model_type)


def finalize_loading(model: nn.Module, *, strict_reload: bool = True) -> dict[str, str]:
    """Close the load (or reload) round of every ``FusedMoE`` in ``model``.

    Raises ``LoadError`` listing every missing (layer, expert, shard) across all layers; a layer in its first
    load keeps its state (``layer.is_loaded`` stays False, and its forward refuses to run); a reload round
    that cannot close tears its layer, and a torn layer raises ``TornWeightsError``. Afterwards checks that
    no parameter of ``model`` is on the meta device.

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
            errors.append(exc)
    if errors:
        err = TornWeightsError if any(isinstance(e, TornWeightsError) for e in errors) else LoadError
        raise err(f"{len(errors)} of {len(layers)} FusedMoE layers are incomplete:\n  " +
                  "\n  ".join(map(str, errors)))
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LoadError(f"parameters still on the meta device after loading: {meta}")
    return status


def reload_weights(model: nn.Module, source, *, model_type: str | None = None, progress: bool = False,
                   strict: bool = True) -> LoadReport:
    """Reload weights into a finalized model in place (RL weight sync), expert by expert.

    Every parameter keeps its ``data_ptr`` (each expert is re-quantized straight into its slot with
    ``quantize_weight_into``), so compiled models and captured CUDA graphs see the new weights. Extra
    memory is the same as a streaming load: one expert's staging. ``strict``: a layer that received some
    weights must receive all of them (otherwise ``LoadError``); a layer that received none keeps its
    weights and a warning names it. A torn layer (a failed reload) must receive all of them.

    A failed reload changes nothing (see ``load_checkpoint``: the source is checked in full first), except
    from a one-shot iterable, which tears what it wrote; a later complete reload heals it. ``model_type`` as
    in ``load_checkpoint``. ``progress=True`` shows the byte-counting bars (off by default: RL syncs are
    frequent and usually in memory).
    """
    layers = name_layers(model)
    not_loaded = [p for p, layer in layers.items() if not (layer.is_loaded or layer.is_torn)]
    if not_loaded:
        raise LoadError(f"reload_weights needs finalized layers; not loaded yet: {not_loaded} "
                        "(use load_checkpoint + finalize_loading first)")
    rounds = {p: layer.load_rounds for p, layer in layers.items()}
    report = _load(model, source, progress=progress, strict=strict, model_type=model_type, finalizing=True)
    status = finalize_loading(model, strict_reload=strict)
    for path, layer in layers.items():
        status[path] = "reloaded" if layer.load_rounds > rounds[path] else "unchanged"
    unchanged = [p for p, s in status.items() if s == "unchanged"]
    if unchanged:
        warnings.warn(f"reload_weights: no weights for {unchanged}; they keep their previous weights", stacklevel=2)
    report.layer_status = status
    return report


__all__ = ["LoadReport", "finalize_loading", "iter_checkpoint", "load_checkpoint", "name_layers", "reload_weights"]
