"""Checkpoint sources (docs/design.md §11): a folder / file of safetensors, a dict, or (name, tensor) pairs."""
from __future__ import annotations

import os
import re
from typing import Iterator

import torch


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


def iter_checkpoint(source) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
    """``(iterator of (name, tensor), count or None)`` for a folder / file path, a dict or an iterable.

    Files are read one tensor at a time (memory-mapped), in natural name order across all files, so each
    expert's shards arrive together and at most one expert is staged at a time."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors import safe_open

        handles = [safe_open(f, framework="pt", device="cpu") for f in safetensors_files(os.fspath(source))]
        index = {name: h for h in handles for name in h.keys()}
        names = sorted(index, key=natural_key)
        return ((n, index[n].get_tensor(n)) for n in names), len(names)
    if isinstance(source, dict):
        return iter(source.items()), len(source)
    count = len(source) if hasattr(source, "__len__") else None
    return iter(source), count
