"""Safetensors files of a checkpoint (docs/design.md §11): which files are read, and the ONE reader of them.

Which files of a folder are read is decided here, once, for ``load_checkpoint`` and the transformers
integration alike (``select_files``): ``model.safetensors.index.json`` when present (only the files its
``weight_map`` lists), else ``model.safetensors``, else every ``*.safetensors`` except Mistral's
``consolidated*.safetensors`` (its original-format copy of the same weights) next to transformers shards.
Every file left out is reported with the reason.

``SafetensorsFiles`` opens the selected files (a file that is not valid safetensors, truncated, garbage or
unreadable, raises ``LoadError`` naming it), knows which file holds each tensor (a name in two files, or not
in the file the index names, is a ``LoadError``), and reads lazily: headers (shape, dtype; no data), slices
(nothing read until indexed) and whole tensors, one at a time. ``load_checkpoint``'s folder source
(``sources.py``) and ``from_pretrained`` both read through it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import LoadError

#: safetensors header dtype -> torch dtype (``getattr``: fp8 / uint types that this torch may lack)
SAFETENSORS_DTYPES = {name: getattr(torch, attr, None) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))}

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


class SafetensorsFiles:
    """Lazy view of the tensors of the files ``selection`` picks: ``names()`` (file order), ``header`` /
    ``shape`` / ``dtype`` (from the header, no data), ``slice`` (a safetensors slice: nothing read until
    indexed), ``tensor`` (one whole tensor), ``path`` / ``file`` (the file holding a name). Holds the files open
    until ``close``. With an index, every name it lists must be in the file it names (``LoadError`` otherwise)."""

    def __init__(self, selection: FileSelection):
        from safetensors import safe_open

        self.selection = selection
        self.files = list(selection.files)
        self._handles: dict[str, object] = {}
        self._paths: dict[str, str] = {}
        for f in self.files:
            try:
                handle = safe_open(f, framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as exc:  # SafetensorError (truncated, garbage), OSError
                raise LoadError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
            for n in names:
                if n in self._paths:
                    raise LoadError(f"checkpoint tensor {n!r} is in two files: {self._paths[n]} and {f}")
                self._paths[n], self._handles[n] = f, handle
        folder = os.path.dirname(selection.index or "")
        for n, f in (selection.weight_map or {}).items():
            held = self._paths.get(n)
            if held is None or os.path.normpath(held) != os.path.normpath(os.path.join(folder, f)):
                where = f"is in {held}" if held else "is in none of its files"
                raise LoadError(f"{selection.index}: checkpoint tensor {n!r} is listed in {f}, but it {where}")

    def names(self) -> list[str]:
        """Every tensor name, file by file in each file's order."""
        return list(self._paths)

    def path(self, name: str) -> str:
        """The file holding ``name`` (as selected: a path)."""
        return self._paths[name]

    def file(self, name: str) -> str:
        """The file holding ``name``, its base name (for messages)."""
        return os.path.basename(self._paths[name])

    def slice(self, name: str):
        return self._handles[name].get_slice(name)

    def header(self, name: str) -> tuple[list[int], str]:
        """``(shape, safetensors dtype string)`` of ``name``; no data is read."""
        handle, path = self._handles[name], self._paths[name]
        try:
            view = handle.get_slice(name)
            return list(view.get_shape()), view.get_dtype()
        except Exception as exc:
            raise LoadError(f"{path}: cannot read the header of tensor {name!r} ({type(exc).__name__}: {exc})") from None

    def spec(self, name: str) -> tuple[list[int], torch.dtype | None, str]:
        """``(shape, torch dtype or None, safetensors dtype string)`` of ``name`` (``formats.detect_fp8``'s
        header); no data is read."""
        shape, code = self.header(name)
        return shape, SAFETENSORS_DTYPES.get(code), code

    def shape(self, name: str) -> list[int]:
        return self.header(name)[0]

    def dtype_str(self, name: str) -> str:
        return self.header(name)[1]

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of ``name``; None when this torch has none for it."""
        return SAFETENSORS_DTYPES.get(self.dtype_str(name))

    def nbytes(self, name: str) -> int | None:
        """Bytes of ``name`` from its header; None when its dtype is unknown to this torch."""
        shape, code = self.header(name)
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            return None
        n = dtype.itemsize
        for d in shape:
            n *= d
        return n

    def tensor(self, name: str) -> torch.Tensor:
        """One whole tensor, read now."""
        handle, path = self._handles[name], self._paths[name]
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise LoadError(f"{path}: cannot read tensor {name!r} ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        self._handles.clear()


__all__ = ["INDEX", "SAFETENSORS_DTYPES", "FileSelection", "SafetensorsFiles", "select_files"]
