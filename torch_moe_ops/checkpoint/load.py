"""Checkpoint loading for models that contain ``FusedMoE`` layers (docs/design.md §10, §11).

- ``load_checkpoint(model, source)``: maps Hugging Face names onto every ``FusedMoE`` (streaming, expert by
  expert) and onto the model's other parameters; returns a ``LoadReport``.
- ``finalize_loading(model)``: closes the load; raises listing every missing (layer, expert, shard).
- ``reload_weights(model, source)``: RL weight sync into the same storage (every ``data_ptr`` kept).

Sources are opened by ``sources.py`` (safetensors through ``files.py``); names resolve through
``resolve.py`` (``P.experts.{e}.*`` and fused expert tensors, the correction bias, the router and shared
experts, anything else by its model name); the layout of fused expert tensors comes from the model type
(``layouts.py``): the ``model_type`` argument, else ``model.config``, else the ``config.json`` next to a
safetensors folder. The passes are ``passes.py``. When a layer refuses the checkpoint's fp8 weights or
scales, the error also names the format the checkpoint's experts are in (``formats.py``, the decision
``from_pretrained`` builds its layers with).

**All or nothing** (docs/online-quantization.md, "Failed loads"). A source that can be read again (a dict,
a list, a safetensors folder) is checked in full before the first write: names, shapes, dtypes and pieces
given twice (a folder: from the file headers, no data read), then every tensor's values (no meta tensor,
no NaN/Inf; a folder: one more read, tensor by tensor), then, for a reload, that every layer it touches
gets a complete set. Any failure raises before anything is written. A one-shot iterator is checked tensor
by tensor; if it fails after writing, the layers it wrote into are torn (forward refuses) until a later
complete reload. ``checkpoint/`` sits above the layer (it needs ``FusedMoE``); the per-layer loading
machinery sits below it.
"""
from __future__ import annotations

import os
import warnings

from torch import nn

from ..errors import LoadError, TornWeightsError
from ..layer import FusedMoE
from ..schemes import FP8_DTYPE
from .formats import block_size_of, detect_source_fp8
from .names import parse_expert_name
from .passes import check_source, run
from .progress import counted, progress_bar
from .report import LoadReport
from .resolve import Resolver
from .sources import folder_config, iter_checkpoint, model_type_for, open_source


def name_layers(model: nn.Module) -> dict[str, FusedMoE]:
    """Every ``FusedMoE`` in ``model`` by module path; sets ``layer.layer_name`` for error messages."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, FusedMoE):
            module.layer_name = path or type(model).__name__
            layers[path] = module
    return layers


def _fp8_hint(model: nn.Module, source, src):
    """``check_source``'s hint: when a layer refuses an fp8 weight or a weight scale, the format the checkpoint's
    experts are in (``formats.detect_source_fp8``, from the specs again: headers only), if it has one."""
    def hint(name: str, tensor) -> str:
        try:
            parsed = parse_expert_name(name)
            fp8 = parsed is not None and (parsed.kind == "scale" or (parsed.kind == "weight"
                                                                     and getattr(tensor, "dtype", None) == FP8_DTYPE))
            if not fp8:
                return ""
            config = getattr(model, "config", None)
            if config is None and isinstance(source, (str, os.PathLike)):
                config = folder_config(os.fspath(source))
            found = detect_source_fp8(src.specs(), block_size_of(config))
        except Exception:  # a hint only: the refusal itself is the error
            return ""
        return f"; this checkpoint's experts are {found.describe()}" if found is not None else ""

    return hint


def _load(model: nn.Module, source, *, progress: bool, strict: bool, model_type: str | None,
          finalizing: bool = False) -> LoadReport:
    layers = name_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no torch_moe_ops.FusedMoE")
    model_type = model_type_for(model_type, getattr(model, "config", None), source)
    res, src = Resolver(model, layers, model_type), open_source(source)
    report = LoadReport(ignored_files=dict(src.ignored_files), model_type=model_type)
    plan = None if src.one_shot else check_source(res, src, strict=strict, finalizing=finalizing, progress=progress,
                                                  hint=_fp8_hint(model, source, src))
    with progress_bar("Loading weights", src.nbytes(), progress) as bar:
        run(res, counted(src.tensors(), bar), plan, report, strict=strict)
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
        model_type: the Hugging Face model type (``"gpt_oss"``, ``"mixtral"``, ...; ``checkpoint.layouts.FORMATS``)
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
