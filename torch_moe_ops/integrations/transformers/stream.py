"""Streaming one block's routed experts from the checkpoint into its ``FusedMoE`` (``from_pretrained``).

Float checkpoints (bf16 / fp16 / fp32) go through ``FusedMoE.weight_loader`` expert by expert, so a quant
config quantizes each expert as it arrives (docs/design.md §10). The checkpoint layout is the model
type's (``ExpertTensors.transposed``: GPT-OSS and Llama-4 store fused ``[E, H, 2I]`` / ``[E, I, H]``; the
square ``down_proj`` of GPT-OSS is never guessed from its shape), converted here and handed over with
``transposed=False``.

Pre-quantized fp8 e4m3 checkpoints take the same path: their weights and scales are ``weight_loader``
pieces of a layer whose ``Fp8Config`` (``fp8_scheme``) matches the checkpoint (block ``weight_scale_inv``
with DeepSeek-V3's ``weight_block_size``, per-tensor or per-channel ``weight_scale``), written as they are,
never re-quantized (the rules: ``loading/prequantized.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import LoadError
from ...quantization import Fp8Config
from .checkpoint import FP8_DTYPES, Checkpoint, ExpertKey
from .convert import build_layer
from .models import BlockPlan

_ORDER = ("w1", "w3", "w2")


@dataclass
class BlockKeys:
    """The checkpoint tensors of one block: per expert ``{e: {(shard, kind): key}}``, fused all-experts
    tensors ``{(shard, kind): key}``, the correction bias."""

    per_expert: dict = field(default_factory=dict)
    fused: dict = field(default_factory=dict)
    correction: ExpertKey | None = None
    input_scales: int = 0

    def add(self, key: ExpertKey) -> None:
        if key.kind == "input_scale":
            self.input_scales += 1
        elif key.shard == "correction":
            self.correction = key
        elif key.expert is None:
            self.fused[(key.shard, key.kind)] = key
        else:
            self.per_expert.setdefault(key.expert, {})[(key.shard, key.kind)] = key

    def all(self) -> list[ExpertKey]:
        keys = [k for d in self.per_expert.values() for k in d.values()] + list(self.fused.values())
        return keys + ([self.correction] if self.correction is not None else [])


def _fail(key: ExpertKey, ckpt: Checkpoint, exc: Exception) -> Exception:
    return type(exc)(f"checkpoint tensor {key.name} ({ckpt.file(key.name)}): {exc}")


def check_keys(path: str, plan: BlockPlan, keys: BlockKeys, ckpt: Checkpoint) -> None:
    """Extra experts and refused formats, before anything is read."""
    E = plan.num_experts
    for k in keys.all():
        if k.kind == "mxfp4":
            raise LoadError(f"{path}: {k.name} is MXFP4 (GPT-OSS's original format), which torch_moe_ops does not "
                            "read; use a bf16 checkpoint (e.g. load with transformers' Mxfp4Config(dequantize=True) "
                            "and save_pretrained)")
        if k.expert is not None and k.expert >= E:
            raise LoadError(f"{path}: checkpoint tensor {k.name} is expert {k.expert}, but the model has {E} experts "
                            "(a checkpoint of another model size?)")
        if k.expert is None and k.shard != "correction" and ckpt.shape(k.name)[0] != E:
            raise LoadError(f"{path}: checkpoint tensor {k.name} holds {ckpt.shape(k.name)[0]} experts, the model {E}")


def fp8_scheme(path: str, keys: BlockKeys, ckpt: Checkpoint, config_block) -> Fp8Config | None:
    """The ``Fp8Config`` of a pre-quantized block, or None for a float checkpoint."""
    weights = [k for k in keys.all() if k.kind == "weight"]
    fp8 = [k for k in weights if ckpt.dtype_str(k.name) in FP8_DTYPES]
    if not fp8:
        bad = [k.name for k in weights if ckpt.dtype(k.name) is None or not ckpt.dtype(k.name).is_floating_point]
        if bad:
            raise LoadError(f"{path}: expert tensors of dtype {ckpt.dtype_str(bad[0])} are not supported: {bad[:3]}")
        return None
    if len(fp8) != len(weights) or keys.fused:
        raise LoadError(f"{path}: only per-expert fp8 checkpoints are read, and all expert weights must be fp8 "
                        f"(got {len(fp8)} fp8 of {len(weights)})")
    scales = [k for k in keys.all() if k.kind == "scale"]
    if not scales:
        raise LoadError(f"{path}: fp8 expert weights without weight_scale / weight_scale_inv: {fp8[0].name}")
    if any(k.scale_inv for k in scales):
        block = tuple(int(b) for b in (config_block or (128, 128)))
        return Fp8Config(scheme="block", block_shape=block)
    first = scales[0]
    rows = ckpt.shape(first.name.rsplit(".", 1)[0] + ".weight")[0]
    n = 1
    for d in ckpt.shape(first.name):
        n *= d
    if n == 1:
        return Fp8Config(scheme="tensor")
    if n == rows:
        return Fp8Config(scheme="channel")
    raise LoadError(f"{path}: cannot tell the fp8 granularity of {first.name} {ckpt.shape(first.name)} "
                    f"(weight rows {rows})")


# ------------------------------------------------------------------------------------------ load
def load_experts(path, plan: BlockPlan, keys: BlockKeys, ckpt: Checkpoint, quant_config, device, dtype, bar):
    """A ``FusedMoE`` on ``device`` filled through ``weight_loader``: float weights quantized online with a
    quant config, or (``quant_config`` from ``fp8_scheme``) a pre-quantized checkpoint's fp8 weights and scales."""
    if plan.moe.get("has_bias") and any(k.kind == "scale" for k in keys.all()):
        raise LoadError(f"{path}: pre-quantized fp8 experts with biases are not supported")
    layer = build_layer(plan, quant_config, device, dtype)
    layer.layer_name = f"{path}.experts"
    ex = plan.experts

    def load(key, target, t, shard, e, **kw):
        try:
            layer.weight_loader(target, t, shard, e, **kw)
        except (ValueError, TypeError, LoadError) as exc:
            raise _fail(key, ckpt, exc) from None
        bar.update(t.numel() * t.element_size())

    for e in sorted(keys.per_expert):
        got = keys.per_expert[e]
        for shard in _ORDER:
            for kind, target in (("weight", "_weight"), ("scale", "_weight_scale"), ("bias", "_bias")):
                key = got.get((shard, kind))
                if key is not None:
                    prefix = "w2" if shard == "w2" else "w13"
                    load(key, prefix + target, ckpt.tensor(key.name), shard, e,
                         **({"transposed": False} if kind == "weight" else {}))
    fused = keys.fused
    if fused:
        slices = {sk: ckpt.slice(k.name) for sk, k in fused.items()}
        for e in range(plan.num_experts):
            for (shard, kind), sl in slices.items():
                key, t = fused[(shard, kind)], sl[e]
                prefix, shard_id = ("w2", "w2") if shard == "w2" else ("w13", None)  # None: fused gate_up rows
                if kind == "weight":
                    t = ex.expert_w13(t) if shard == "w13" else ex.expert_w2(t)
                    load(key, prefix + "_weight", t, shard_id, e, transposed=False)
                else:
                    load(key, prefix + "_bias", t, shard_id, e)
    if keys.correction is not None:
        c = keys.correction
        load(c, "e_score_correction_bias", ckpt.tensor(c.name).reshape(-1).float(), None, None)
    try:
        layer.finalize_loading()
    except LoadError as exc:
        raise LoadError(f"the checkpoint is missing routed-expert tensors: {exc}") from None
    return layer
