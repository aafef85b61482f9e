"""Checkpoint sources (docs/design.md §11): a folder / file of safetensors, a dict, or (name, tensor) pairs.

``open_source`` wraps each in a ``Source`` that the checkpoint loader reads in up to three passes
(docs/online-quantization.md, "Failed loads"): ``specs`` (names, shapes and dtypes: a safetensors file's
header, no data), then ``tensors`` once to check the values and once to write them. A one-shot iterator
(a generator) can be read only once: it is checked and written tensor by tensor.

A folder or file is read through the one safetensors reader (``files.py``: which files, headers, lazy
reads; a file that is not valid safetensors raises ``LoadError`` naming it). ``nbytes`` of a source
(headers, or the tensors' sizes) is what the progress bars count. ``model_type_for`` decides the model type
whose expert layouts apply (``layouts.py``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from typing import Iterator

import torch

from ..errors import LoadError
from .files import SAFETENSORS_DTYPES, SafetensorsFiles, select_files
from .layouts import FORMATS, expert_format, model_type_of

def natural_key(name: str):
    """``experts.2`` sorts before ``experts.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def folder_config(path: str) -> dict | None:
    """The ``config.json`` next to a checkpoint folder (or file), or None when there is none."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    f = os.path.join(folder, "config.json")
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{f}: not a readable config.json ({type(exc).__name__}: {exc})") from None
    return config if isinstance(config, dict) else None


def model_type_for(model_type: str | None, config, source) -> str | None:
    """The model type that decides expert layouts: ``model_type`` (which must be known), else the model's
    ``config`` (a transformers config), else the ``config.json`` next to a folder / file ``source``."""
    if model_type is not None:
        if expert_format(model_type) is None:
            raise ValueError(f"model_type={model_type!r} has no known expert layout; known: {sorted(FORMATS)} (or "
                             "None: non-square fused expert tensors are then recognised by their shape)")
        return model_type
    found = model_type_of(config)
    if found is None and isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        found = model_type_of(folder_config(os.fspath(source)))
    return found


def tensor_nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class Source:
    """A checkpoint as ``(name, tensor, origin)`` triples; ``origin`` is the file (None in memory).

    one_shot: readable once (``tensors`` only). in_memory: ``specs`` yields the real tensors, so the value
    checks need no second read. count: number of tensors, or None when unknown. ignored_files: file ->
    why it is not read (folders)."""

    one_shot = False
    in_memory = True
    ignored_files: dict[str, str] = {}

    def __init__(self, pairs, count: int | None):
        self._pairs, self.count = pairs, count

    def nbytes(self) -> int | None:
        """Bytes of all tensors (the progress bars' total), or None when unknown."""
        try:
            return sum(tensor_nbytes(item[1]) for item in self._pairs)
        except (TypeError, IndexError, KeyError):
            return None  # not (name, tensor) pairs: ``tensors`` raises naming the problem

    def specs(self) -> Iterator[tuple[str, torch.Tensor, str | None]]:
        return self.tensors()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, str | None]]:
        for item in self._pairs:
            try:
                name, tensor = item
            except (TypeError, ValueError):
                name = tensor = None
            if not isinstance(name, str):
                raise TypeError(f"a checkpoint iterable must yield (name, tensor) pairs, got {type(item).__name__}")
            yield name, tensor, None


class _OneShot(Source):
    one_shot = True

    def specs(self):
        raise RuntimeError("a one-shot source cannot be read ahead")

    def nbytes(self) -> None:
        return None


class SafetensorsSource(Source):
    """Every tensor of the files ``select_files`` picks (read through ``files.SafetensorsFiles``), in natural
    name order across all files, so each expert's shards arrive together even when they sit in different files.
    Tensors are read one at a time."""

    in_memory = False

    def __init__(self, path: str):
        selection = select_files(path)
        self.ignored_files = selection.ignored
        self.reader = SafetensorsFiles(selection)
        self.names = sorted(self.reader.names(), key=natural_key)
        self.count = len(self.names)

    def nbytes(self) -> int | None:
        """From the headers (no data read); None if a header cannot be read (``specs`` names it)."""
        total = 0
        try:
            for n in self.names:
                size = self.reader.nbytes(n)
                if size is None:
                    return None
                total += size
        except Exception:
            return None
        return total

    def specs(self):
        """Header only: a meta tensor of each tensor's shape and dtype (no data is read)."""
        for n in self.names:
            shape, code = self.reader.header(n)
            dtype = SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise LoadError(f"{self.reader.path(n)}: tensor {n!r} has dtype {code}, which this torch cannot load")
            yield n, torch.empty(shape, dtype=dtype, device="meta"), self.reader.path(n)

    def tensors(self):
        for n in self.names:
            yield n, self.reader.tensor(n), self.reader.path(n)


def open_source(source) -> Source:
    """A ``Source`` for a folder / file path, a dict, a re-iterable collection of pairs (a list, ``dict.items()``)
    or a one-shot iterable (a generator)."""
    if isinstance(source, (str, os.PathLike)):
        return SafetensorsSource(os.fspath(source))
    if isinstance(source, Mapping):
        return Source(source.items(), len(source))
    if isinstance(source, Collection):
        return Source(source, len(source))
    return _OneShot(iter(source), len(source) if hasattr(source, "__len__") else None)


def iter_checkpoint(source) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
    """``(iterator of (name, tensor), count or None)`` for any source ``open_source`` accepts (one read)."""
    src = open_source(source)
    return ((n, t) for n, t, _ in src.tensors()), src.count
