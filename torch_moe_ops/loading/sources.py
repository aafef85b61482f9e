"""Checkpoint sources (docs/design.md §11): a folder / file of safetensors, a dict, or (name, tensor) pairs.

``open_source`` wraps each in a ``Source`` that the checkpoint loader reads in up to three passes
(docs/online-quantization.md, "Failed loads"): ``specs`` (names, shapes and dtypes: a safetensors file's
header, no data), then ``tensors`` once to check the values and once to write them. A one-shot iterator
(a generator) can be read only once: it is checked and written tensor by tensor.

A file that is not valid safetensors (truncated, garbage, unreadable) raises ``LoadError`` naming it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from typing import Iterator

import torch

from ..errors import LoadError

#: safetensors header dtype -> torch dtype (``getattr``: fp8 / uint types that this torch may lack)
_DTYPES = {name: getattr(torch, attr, None) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))}


def natural_key(name: str):
    """``experts.2`` sorts before ``experts.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def safetensors_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path!r}")
        return files
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    raise FileNotFoundError(f"{path!r} is neither a folder of .safetensors files nor a .safetensors file")


class Source:
    """A checkpoint as ``(name, tensor, origin)`` triples; ``origin`` is the file (None in memory).

    one_shot: readable once (``tensors`` only). in_memory: ``specs`` yields the real tensors, so the value
    checks need no second read. count: number of tensors, or None when unknown."""

    one_shot = False
    in_memory = True

    def __init__(self, pairs, count: int | None):
        self._pairs, self.count = pairs, count

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


class SafetensorsSource(Source):
    """Every tensor of a folder (or one file) of safetensors, in natural name order across all files, so each
    expert's shards arrive together even when they sit in different files. Tensors are read one at a time."""

    in_memory = False

    def __init__(self, path: str):
        from safetensors import safe_open

        self.handles, self.files = {}, {}
        for f in safetensors_files(path):
            try:
                handle = safe_open(f, framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as exc:  # SafetensorError (truncated, garbage), OSError
                raise LoadError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
            for n in names:
                if n in self.files:
                    raise LoadError(f"checkpoint tensor {n!r} is in two files: {self.files[n]} and {f}")
                self.files[n], self.handles[n] = f, handle
        self.names = sorted(self.files, key=natural_key)
        self.count = len(self.names)

    def specs(self):
        """Header only: a meta tensor of each tensor's shape and dtype (no data is read)."""
        for n in self.names:
            f = self.files[n]
            try:
                view = self.handles[n].get_slice(n)
                shape, code = view.get_shape(), view.get_dtype()
            except Exception as exc:
                raise LoadError(f"{f}: cannot read the header of tensor {n!r} ({type(exc).__name__}: {exc})") from None
            dtype = _DTYPES.get(code)
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
