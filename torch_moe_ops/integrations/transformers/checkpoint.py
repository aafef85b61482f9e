"""The safetensors side of ``from_pretrained``: which files, which tensors are routed experts, lazy reads.

Files: the one rule of ``checkpoint/files.py`` (``select_files``): ``model.safetensors.index.json`` when
present (only the shards it names are opened), otherwise ``model.safetensors``, otherwise every
``*.safetensors`` but Mistral's ``consolidated*.safetensors``; files left out are reported as ignored.

Expert tensor names (``L`` the decoder layer, ``e`` the expert; ``P`` any block prefix such as
``model.layers.L.mlp`` / ``.block_sparse_moe`` / ``.feed_forward``):

- per expert: ``P.experts.e.{w1|w3|w2|gate_proj|up_proj|down_proj}.{weight|bias}``, with fp8 checkpoints'
  ``weight_scale_inv`` (block) / ``weight_scale`` (tensor, channel) and ``input_scale`` siblings;
- fused, all experts: ``P.experts.{gate_up_proj|down_proj}[_bias]`` (GPT-OSS, Llama-4: stored transposed),
  ``P.{input_linear|output_linear}.weight`` (Granite); MXFP4 ``_blocks`` / ``_scales`` are recognised and refused;
- routing bias: ``P.gate.e_score_correction_bias`` (DeepSeek-V3, GLM) or ``P.moe_statics.e_score_correction_bias``
  (Ernie, ``[1, E]``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ...checkpoint.files import SAFETENSORS_DTYPES, select_files

_LAYER = r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+))\.(?P<blk>\w+)\."
_PER_EXPERT = re.compile(_LAYER + r"experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\."
                                  r"(?P<kind>weight|bias|weight_scale_inv|weight_scale|input_scale)$")
_FUSED = re.compile(_LAYER + r"experts\.(?P<proj>gate_up_proj|down_proj)"
                              r"(?P<kind>|\.weight|_bias|\.bias|_blocks|_scales)$")
_GRANITE = re.compile(_LAYER + r"(?P<proj>input_linear|output_linear)\.(?P<kind>weight)$")
_CORRECTION = re.compile(_LAYER + r"(?:gate\.|moe_statics\.|gate\.moe_statics\.)e_score_correction_bias$")
_SHARD = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2",
          "gate_up_proj": "w13", "input_linear": "w13", "output_linear": "w2"}
#: safetensors dtype strings of fp8 e4m3 (the only pre-quantized format read)
FP8_DTYPES = ("F8_E4M3",)


@dataclass(frozen=True)
class ExpertKey:
    """One routed-expert tensor of the checkpoint. expert: None for a fused all-experts tensor. shard: ``w1``
    (gate), ``w3`` (up), ``w2`` (down), ``w13`` (fused gate_up) or ``correction``. kind: ``weight``, ``bias``,
    ``scale`` (fp8 ``weight_scale`` / ``weight_scale_inv``), ``input_scale`` or ``mxfp4``."""

    name: str
    pre: str
    layer: int
    blk: str
    expert: int | None
    shard: str
    kind: str
    scale_inv: bool = False

    def blk_ok(self, attr: str, legacy: tuple[str, ...]) -> bool:
        """Whether this tensor can belong to a block at attribute ``attr`` of its decoder layer."""
        return self.blk == attr or self.blk in legacy


def parse(name: str) -> ExpertKey | None:
    """The expert tensor ``name`` describes, or None for any other tensor."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        kind = m["kind"]
        k = {"weight_scale_inv": "scale", "weight_scale": "scale"}.get(kind, kind)
        return ExpertKey(name, m["pre"], int(m["layer"]), m["blk"], int(m["expert"]), _SHARD[m["proj"]], k,
                         kind == "weight_scale_inv")
    for rx in (_FUSED, _GRANITE):
        m = rx.match(name)
        if m is not None:
            kind = m["kind"]
            k = "mxfp4" if kind in ("_blocks", "_scales") else ("bias" if "bias" in kind else "weight")
            return ExpertKey(name, m["pre"], int(m["layer"]), m["blk"], None, _SHARD[m["proj"]], k)
    m = _CORRECTION.match(name)
    if m is not None:
        return ExpertKey(name, m["pre"], int(m["layer"]), m["blk"], None, "correction", "bias")
    return None


def checkpoint_files(path: str) -> tuple[list[str], list[str]]:
    """(safetensors files to read, files ignored as ``"file (why)"``): ``checkpoint.files.select_files``'s rule."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder (from_pretrained streams a local checkpoint folder; "
                                "download a Hub model first, e.g. `hf download <repo> --local-dir <folder>`)")
    selection = select_files(path)
    return selection.files, [f"{f} ({why})" for f, why in selection.ignored.items()]


class Checkpoint:
    """Lazy view of a checkpoint's tensors: ``slice(name)`` (safetensors slice, nothing read), ``tensor``,
    ``shape``, ``dtype`` and ``file`` of each name. Holds the files open until ``close``."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.files = files
        self._handles = [safe_open(f, framework="pt", device="cpu") for f in files]
        self._where: dict[str, int] = {}
        for i, h in enumerate(self._handles):
            for name in h.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name} is in two files: {files[self._where[name]]} and {files[i]}")
                self._where[name] = i

    def names(self) -> list[str]:
        return list(self._where)

    def slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self.slice(name).get_shape())

    def dtype_str(self, name: str) -> str:
        return self.slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype_str(name))

    def nbytes(self, name: str) -> int:
        dt = self.dtype(name)
        n = 1
        for d in self.shape(name):
            n *= d
        return n * (dt.itemsize if dt is not None else 1)

    def file(self, name: str) -> str:
        return os.path.basename(self.files[self._where[name]])

    def close(self) -> None:
        self._handles.clear()
