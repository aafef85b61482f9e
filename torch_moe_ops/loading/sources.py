"""Checkpoint sources (docs/design.md §11): a folder / file of safetensors, a dict, or (name, tensor) pairs.

``open_source`` wraps each in a ``Source`` that the checkpoint loader reads in up to three passes
(docs/online-quantization.md, "Failed loads"): ``specs`` (names, shapes and dtypes: a safetensors file's
header, no data), then ``tensors`` once to check the values and once to write them. A one-shot iterator
(a generator) can be read only once: it is checked and written tensor by tensor.

A file that is not valid safetensors (truncated, garbage, unreadable) raises ``LoadError`` naming it.

Which files of a folder are read is decided here, once, for ``load_checkpoint`` and the transformers
integration alike (``select_files``): ``model.safetensors.index.json`` when present (only the files its
``weight_map`` lists), else ``model.safetensors``, else every ``*.safetensors`` except Mistral's
``consolidated*.safetensors`` (its original-format copy of the same weights) next to transformers shards.
Every file left out is reported with the reason. ``nbytes`` of a source (headers, or the tensors' sizes)
is what the progress bars count.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import LoadError
from .formats import FORMATS, expert_format, model_type_of

#: safetensors header dtype -> torch dtype (``getattr``: fp8 / uint types that this torch may lack)
SAFETENSORS_DTYPES = {name: getattr(torch, attr, None) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))}


def natural_key(name: str):
    """``experts.2`` sorts before ``experts.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class FileSelection:
    """The safetensors files of a checkpoint to read. ignored: file name -> why it is not read. weight_map:
    the index's tensor name -> file name (None without an index)."""

    files: list[str]
    ignored: dict[str, str] = field(default_factory=dict)
    weight_map: dict[str, str] | None = None
    index: str | None = None


def select_files(path: str) -> FileSelection:
    """The files a folder (or one ``.safetensors`` file) contributes; the rule of the module docstring.

    Raises ``FileNotFoundError`` naming a file the index lists that is not there (or a folder without
    safetensors), ``LoadError`` for an index that is not valid JSON with a ``weight_map``."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return FileSelection([path])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a folder of .safetensors files nor a .safetensors file")
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise LoadError(f"{index}: not a readable safetensors index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index}: no weight_map of tensor name -> file name")
        used = sorted(set(weight_map.values()))
        missing = [f for f in used if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path!r}: {missing}")
        ignored = {f: f"not in {INDEX}" for f in names if f not in used}
        return FileSelection([os.path.join(path, f) for f in used], ignored, weight_map, index)
    hf = [f for f in names if not f.startswith("consolidated")]
    if not names:
        raise FileNotFoundError(f"no .safetensors files in {path!r}")
    if not hf:
        raise FileNotFoundError(f"{path!r} has only consolidated*.safetensors (Mistral's own format); convert it "
                                "to a transformers checkpoint first")
    read = ["model.safetensors"] if "model.safetensors" in hf else hf
    ignored = {f: "Mistral consolidated format; the transformers files are read" if f not in hf else
               "not model.safetensors (there is no index)" for f in names if f not in read}
    return FileSelection([os.path.join(path, f) for f in read], ignored)


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
    """Every tensor of the files ``select_files`` picks, in natural name order across all files, so each
    expert's shards arrive together even when they sit in different files. Tensors are read one at a time.
    With an index, every name it lists must be in the file it names (``LoadError`` otherwise)."""

    in_memory = False

    def __init__(self, path: str):
        from safetensors import safe_open

        selection = select_files(path)
        self.ignored_files = selection.ignored
        self.handles, self.files = {}, {}
        for f in selection.files:
            try:
                handle = safe_open(f, framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as exc:  # SafetensorError (truncated, garbage), OSError
                raise LoadError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
            for n in names:
                if n in self.files:
                    raise LoadError(f"checkpoint tensor {n!r} is in two files: {self.files[n]} and {f}")
                self.files[n], self.handles[n] = f, handle
        folder = os.path.dirname(selection.index or "")
        for n, f in (selection.weight_map or {}).items():
            held = self.files.get(n)
            if held is None or os.path.normpath(held) != os.path.normpath(os.path.join(folder, f)):
                where = f"is in {held}" if held else "is in none of its files"
                raise LoadError(f"{selection.index}: checkpoint tensor {n!r} is listed in {f}, but it {where}")
        self.names = sorted(self.files, key=natural_key)
        self.count = len(self.names)

    def nbytes(self) -> int | None:
        """From the headers (no data read); None if a header cannot be read (``specs`` names it)."""
        total = 0
        try:
            for n in self.names:
                view = self.handles[n].get_slice(n)
                numel = 1
                for d in view.get_shape():
                    numel *= d
                total += numel * SAFETENSORS_DTYPES[view.get_dtype()].itemsize
        except Exception:
            return None
        return total

    def specs(self):
        """Header only: a meta tensor of each tensor's shape and dtype (no data is read)."""
        for n in self.names:
            f = self.files[n]
            try:
                view = self.handles[n].get_slice(n)
                shape, code = view.get_shape(), view.get_dtype()
            except Exception as exc:
                raise LoadError(f"{f}: cannot read the header of tensor {n!r} ({type(exc).__name__}: {exc})") from None
            dtype = SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise LoadError(f"{f}: tensor {n!r} has dtype {code}, which this torch cannot load")
            yield n, torch.empty(shape, dtype=dtype, device="meta"), f

    def tensors(self):
        for n in self.names:
            f = self.files[n]
            try:
                t = self.handles[n].get_tensor(n)
            except Exception as exc:
                raise LoadError(f"{f}: cannot read tensor {n!r} ({type(exc).__name__}: {exc})") from None
            yield n, t, f


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
