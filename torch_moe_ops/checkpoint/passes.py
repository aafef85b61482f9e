"""The passes of a model-level load (docs/online-quantization.md, "Failed loads"): the check pass of a
source that can be read again (``check_source``: every check before the first write) and the write pass
(``run``: also a one-shot stream, checked tensor by tensor, which tears what it wrote when it fails).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import LoadError, TornWeightsError
from .progress import counted, progress_bar
from .report import LoadReport
from .resolve import Action, Given, Resolver, describe_tensor


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


def check_source(res: Resolver, src, *, strict: bool, finalizing: bool, progress: bool,
                 hint: Callable[[str, torch.Tensor], str] | None = None):
    """Every check, before any write: returns ``{name: (action, pieces)}`` or raises (nothing written).
    ``hint(name, tensor)``: more to say when a tensor's checks refuse it (``TypeError`` / ``ValueError``)."""
    plan, given = {}, Given()
    for name, tensor, origin in src.specs():
        try:
            if name in plan:
                raise LoadError("appears twice in the source")
            action = res.action(name)
            pieces = action.check(tensor, origin, values=src.in_memory)
            given.add(action, pieces, origin)
        except Exception as exc:
            more = hint(name, tensor) if hint is not None and type(exc) in (TypeError, ValueError) else ""
            _raise_in_context(exc, describe_tensor(name, origin), more + "; nothing was written")
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


def run(res: Resolver, items, plan, report: LoadReport, *, strict: bool) -> None:
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


__all__ = ["check_source", "run"]
