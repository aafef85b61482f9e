"""``from_pretrained(path, quant_config)``: a transformers model whose routed experts never exist in full
precision on the device.

1. The model class is instantiated by transformers on the meta device (as it always does) through a
   subclass whose ``__init__`` swaps every supported MoE block for a ``MoEBlock`` without experts.
2. transformers loads everything else (``from_pretrained(state_dict=...)`` with lazy safetensors slices
   of the non-expert tensors: its renames, dtype rules, tied weights and reports apply as usual).
3. Each block's experts stream from the safetensors files into a ``FusedMoE`` allocated at its final
   (quantized) size on the device, one expert at a time (``stream.py``).

Files, the safetensors reader, expert names and the pre-quantized format are the checkpoint pipeline's
(``torch_moe_ops/checkpoint/``); which tensors go to which block is ``checkpoint.py`` here.

Peak device memory: the final model + one expert's full-precision staging (+ a transient copy), within
final + 2 experts + 64 MiB. Blocks the package cannot replace are loaded by transformers unchanged and
named in the report.
"""
from __future__ import annotations

import os
import warnings

import torch

from ...checkpoint.files import SafetensorsFiles as Checkpoint  # the one reader (tests patch this name)
from ...checkpoint.formats import block_size_of, detect_prequantized
from ...checkpoint.progress import progress_bar
from ...errors import LoadError
from ... import _modes
from ...schemes.configs import check_quant_config
from .block import MoEBlock
from .checkpoint import assign_keys, check_keys, checkpoint_files
from .models import MODEL_TYPES
from .patch import PatchReport, _check_layer, _set_child, find_blocks, record_router_logits
from .stream import load_experts


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"no causal-LM class for {type(config).__name__}; pass model_class=") from None


def _skeleton_class(cls, quant_config, sink: dict):
    """A subclass of ``cls`` whose instances have ``MoEBlock`` placeholders (no experts) for supported blocks;
    each instantiation records ``sink["blocks"]`` ({path: plan}) and ``sink["unsupported"]`` ({path: why})."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        planned, unsupported, _ = find_blocks(self)
        sink["unsupported"], sink["blocks"] = unsupported, {}
        for path, _block, plan in planned:
            try:
                _check_layer(plan, None)
                if quant_config is not None:
                    _check_layer(plan, quant_config)
            except ValueError as exc:
                raise ValueError(f"{path} ({plan.block_class}): {exc}") from None
            _set_child(self, path, MoEBlock(plan, None))
            sink["blocks"][path] = plan

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


def _without_mxfp4(config):
    """``config`` without transformers' own MXFP4 ``quantization_config`` (GPT-OSS): its experts are ours and
    stay packed (``Mxfp4Config``), and every other tensor of such a checkpoint is a float one. A copy; any other
    quantization config is left to transformers."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "mxfp4":
        return config
    import copy

    config = copy.deepcopy(config)
    del config.quantization_config
    return config


def _dtype(dtype, config, ckpt: Checkpoint) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        return getattr(torch, str(dtype))
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    if isinstance(cfg, torch.dtype) and cfg.is_floating_point and cfg.itemsize > 1:
        return cfg
    for name in ckpt.names():
        dt = ckpt.dtype(name)
        if dt is not None and dt.is_floating_point and dt.itemsize > 1:
            return dt
    return torch.float32


def from_pretrained(path, quant_config=None, *, device=None, dtype=None, model_class=None, progress: bool = True,
                    strict: bool = True, batch_invariant: bool | None = None, **hf_kwargs):
    """Load a transformers MoE model from a local safetensors folder with torch_moe_ops experts.

    Args:
        path: checkpoint folder (``config.json`` + safetensors; ``model.safetensors.index.json`` respected).
        quant_config: None (the checkpoint's precision; a pre-quantized fp8 checkpoint, or GPT-OSS's MXFP4, stays
            as it is),
            ``Fp8Config`` / ``Int8Config`` / ``Int4Config`` or a scheme name such as ``"fp8_block"`` (experts
            quantized while they stream).
        device: where the model goes (default: cpu). dtype: model dtype (default: the config's).
        model_class: the transformers class (default: the causal-LM class of the config).
        progress: a progress bar counting expert bytes. strict: raise when transformers reports missing
            non-expert weights (else a warning and a report note).
        batch_invariant: every expert layer's ``FusedMoE.batch_invariant`` (None: follow
            ``torch_moe_ops.batch_invariant()``; docs/batch-invariance.md says what it covers in a model).
        hf_kwargs: passed to transformers' ``from_pretrained`` (``attn_implementation``, ``config``, ...).

    Returns:
        The model, in eval mode; ``model.torch_moe_ops_report`` is the ``PatchReport`` (with ``loading``).
    """
    from transformers import AutoConfig, GenerationConfig

    quant_config = check_quant_config(quant_config)
    _modes.resolve(batch_invariant)  # TypeError before anything is read
    path = os.fspath(path)
    selection = checkpoint_files(path)
    files, ignored_files = selection.files, [f"{f} ({why})" for f, why in selection.ignored.items()]
    config = _without_mxfp4(hf_kwargs.pop("config", None) or AutoConfig.from_pretrained(path))
    cls = _model_class(config, model_class)
    ckpt = Checkpoint(selection)
    try:
        dt = _dtype(dtype, config, ckpt)
        sink: dict = {}
        skeleton = _skeleton_class(cls, quant_config, sink)
        with torch.device("meta"):
            skeleton._from_config(config, dtype=dt)  # where the blocks are (meta: no memory)
        blocks, unsupported = sink["blocks"], sink["unsupported"]
        if not blocks:
            raise ValueError(f"{cls.__name__} (model_type {config.model_type!r}) has no MoE block torch_moe_ops can "
                             f"replace{': ' + str(unsupported) if unsupported else ''}; supported model types: "
                             f"{sorted(MODEL_TYPES)}")
        per_block, others, ignored = assign_keys(ckpt, blocks, list(unsupported), cls)
        for p, plan in blocks.items():
            check_keys(p, plan, per_block[p], ckpt)
        block_size = block_size_of(config)
        pre = {p: detect_prequantized(p, per_block[p].names(), ckpt.spec, block_size) for p in blocks}
        _check_prequantized(pre, quant_config)
        state = {name: ckpt.slice(name) for name in others}
        model, info = skeleton.from_pretrained(None, config=config, state_dict=state, dtype=dt,
                                               output_loading_info=True, **hf_kwargs)
        model.__class__ = cls
        report = _report(quant_config, pre, sink["unsupported"], files, ignored_files, ignored, info)
        _check_info(info, strict, report)
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):
            model.generation_config = GenerationConfig.from_pretrained(path)
        if device is not None and "device_map" not in hf_kwargs:
            model.to(device)
        total = sum(ckpt.nbytes(k.name) or 0 for keys in per_block.values() for k in keys.all())
        report.expert_bytes_before = total  # in the checkpoint's dtypes
        with progress_bar("Loading experts", total, progress) as bar:
            for p, plan in sink["blocks"].items():
                _load_block(model, p, plan, per_block[p], ckpt, quant_config, pre[p], device, dt, bar, report)
                model.get_submodule(p).experts.batch_invariant = batch_invariant
    finally:
        ckpt.close()
    model.eval()
    model.torch_moe_ops_report = report
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return model


def _load_block(model, path, plan, keys, ckpt, quant_config, pre, device, dt, bar, report) -> None:
    block: MoEBlock = model.get_submodule(path)
    dev = torch.device(device) if device is not None else block.router_linear().weight.device
    layer = load_experts(path, plan, keys, ckpt, pre if pre is not None else quant_config, dev, dt, bar)
    block.experts = layer
    record_router_logits(model, block)
    report.replaced[path] = f"{plan.block_class} -> MoEBlock({plan.describe()}, {layer.quant_scheme})"
    report.expert_bytes_after += sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))
    report.loading["expert_tensors"] = report.loading.get("expert_tensors", 0) + len(keys.all())
    if keys.input_scales:
        report.notes.append(f"{path}: {keys.input_scales} static input_scale tensors ignored (activations are "
                            "quantized dynamically per token)")


def _check_prequantized(pre: dict, quant_config) -> None:
    """``pre``: {block path: the config its pre-quantized experts need, or None}; one format, and no other
    ``quant_config`` than it."""
    schemes = {str(q) for q in pre.values()}
    if len(schemes) > 1:
        raise LoadError(f"the checkpoint mixes expert formats across layers: {sorted(schemes)}")
    first = next(iter(pre.values()), None)
    if first is not None and quant_config is not None and quant_config != first:
        raise ValueError(f"the checkpoint's experts are pre-quantized as {first}; quant_config={quant_config} would "
                         f"need re-quantizing them. Pass quant_config=None or {first}")


def _report(quant_config, pre_by_block, unsupported, files, ignored_files, ignored, info) -> PatchReport:
    pre = next((q for q in pre_by_block.values() if q is not None), None)
    qc = pre or quant_config
    report = PatchReport(skipped=dict(unsupported), quant_scheme=qc.quant_scheme.name if qc is not None else "none")
    report.loading = {"files": [os.path.basename(f) for f in files], "ignored_files": ignored_files,
                      "ignored_tensors": ignored, "prequantized": str(pre) if pre is not None else None,
                      "hf_missing_keys": sorted(info.get("missing_keys", [])),
                      "hf_unexpected_keys": sorted(info.get("unexpected_keys", []))}
    report.notes += [f"ignored file {f}" for f in ignored_files]
    return report


def _check_info(info, strict: bool, report: PatchReport) -> None:
    missing = report.loading["hf_missing_keys"]
    if missing and strict:
        more = " ..." if len(missing) > 8 else ""
        raise LoadError(f"the checkpoint lacks {len(missing)} non-expert weights, which transformers would "
                        f"initialize randomly: {missing[:8]}{more} (strict=False to allow)")
    if missing:
        report.notes.append(f"{len(missing)} non-expert weights missing from the checkpoint: {missing[:8]}")
        warnings.warn(f"torch_moe_ops from_pretrained: {report.notes[-1]} (transformers initialized them)",
                      stacklevel=3)
    if report.loading["hf_unexpected_keys"]:
        report.notes.append(f"transformers ignored {len(report.loading['hf_unexpected_keys'])} unexpected tensors")


__all__ = ["from_pretrained"]
