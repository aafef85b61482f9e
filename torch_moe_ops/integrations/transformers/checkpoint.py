"""Which checkpoint tensors belong to which planned MoE block of a transformers model (``from_pretrained``).

Files, tensor names, layouts and pre-quantized formats are the checkpoint pipeline's (``torch_moe_ops/checkpoint/``:
``files.select_files`` and the one safetensors reader ``files.SafetensorsFiles``, ``names.parse_block_tensor``,
``formats.detect_fp8``). What is transformers' is here: a local folder is required, blocks are found by their
module path in the model transformers built, the legacy block names transformers renames (Mixtral's
``block_sparse_moe``), a model class's ``_keys_to_ignore_on_load_unexpected``, and the number of experts of the
planned block.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ...checkpoint.files import FileSelection, SafetensorsFiles, select_files
from ...checkpoint.names import BlockTensor, layer_index, parse_block_tensor
from ...errors import LoadError
from .models import BlockPlan

_LEGACY_BLOCK_NAMES = ("block_sparse_moe",)  #: checkpoint names transformers renames to the block's (Mixtral, PhiMoE)


def checkpoint_files(path: str) -> FileSelection:
    """The safetensors files of a local checkpoint folder (``checkpoint.files.select_files``'s rule)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a folder (from_pretrained streams a local checkpoint folder; "
                                "download a Hub model first, e.g. `hf download <repo> --local-dir <folder>`)")
    return select_files(path)


@dataclass
class BlockKeys:
    """The checkpoint tensors of one block: per expert ``{e: {(shard, kind): key}}``, fused all-experts
    tensors ``{(shard, kind): key}``, the correction bias."""

    per_expert: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    correction: BlockTensor | None = None
    input_scales: int = 0

    def add(self, key: BlockTensor) -> None:
        if key.kind == "input_scale":
            self.input_scales += 1
        elif key.shard == "correction":
            self.correction = key
        elif key.expert is None:
            self.fused[(key.shard, key.kind)] = key
        else:
            self.per_expert.setdefault(key.expert, {})[(key.shard, key.kind)] = key

    def all(self) -> list[BlockTensor]:
        keys = [k for d in self.per_expert.values() for k in d.values()] + list(self.fused.values())
        return keys + ([self.correction] if self.correction is not None else [])

    def names(self) -> list[str]:
        return [k.name for k in self.all()]


def assign_keys(ckpt: SafetensorsFiles, blocks: dict[str, object], other_moe: list[str], cls) -> tuple:
    """({block path: BlockKeys}, non-expert names for transformers, {name: why ignored})."""
    by_layer: dict[int, list[str]] = {}
    for path in blocks:
        by_layer.setdefault(layer_index(path), []).append(path)
    unsupported_layers = {layer_index(p) for p in other_moe}
    attrs = {p.rpartition(".")[2] for p in blocks} | set(_LEGACY_BLOCK_NAMES)
    ignore = [re.compile(p) for p in (getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])]
    per_block = {path: BlockKeys() for path in blocks}
    others, ignored = [], {}
    for name in ckpt.names():
        key = parse_block_tensor(name)
        if key is not None and key.blk not in attrs:
            key = None  # e.g. Granite's shared_mlp.input_linear: expert-like names under another child
        hits = [] if key is None else [p for p in by_layer.get(key.layer, [])
                                       if key.blk_ok(p.rpartition(".")[2], _LEGACY_BLOCK_NAMES)]
        if key is None or (not hits and key.layer in unsupported_layers):
            others.append(name)  # not an expert, or an expert of a block transformers keeps
            continue
        if not hits:
            if any(rx.search(name) for rx in ignore):
                ignored[name] = f"{cls.__name__} ignores this layer (_keys_to_ignore_on_load_unexpected)"
                continue
            raise LoadError(f"checkpoint tensor {name} ({ckpt.file(name)}) is a routed expert of layer {key.layer}, "
                            f"but the model has no MoE block there (MoE blocks at layers {sorted(by_layer)}); "
                            "a checkpoint of another model, or a config mismatch")
        if len(hits) > 1:  # several MoE stacks with this layer index: the one whose prefix the name ends with
            stack = key.pre.rpartition("layers.")[0].rstrip(".")
            hits = [p for p in hits if p.rpartition("layers.")[0].rstrip(".").endswith(stack)] or hits
            if len(hits) > 1:
                raise LoadError(f"checkpoint tensor {name}: cannot tell which of {hits} it belongs to")
        per_block[hits[0]].add(key)
    return per_block, others, ignored


def check_keys(path: str, plan: BlockPlan, keys: BlockKeys, ckpt: SafetensorsFiles) -> None:
    """Extra experts and refused formats, before anything is read."""
    E = plan.num_experts
    for k in keys.all():
        if k.expert is not None and k.expert >= E:
            raise LoadError(f"{path}: checkpoint tensor {k.name} is expert {k.expert}, but the model has {E} experts "
                            "(a checkpoint of another model size?)")
        if k.expert is None and k.shard != "correction" and ckpt.shape(k.name)[0] != E:
            raise LoadError(f"{path}: checkpoint tensor {k.name} holds {ckpt.shape(k.name)[0]} experts, the model {E}")


__all__ = ["BlockKeys", "assign_keys", "check_keys", "checkpoint_files"]
