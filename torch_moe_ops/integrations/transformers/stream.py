"""Streaming one block's routed experts from the checkpoint into its ``FusedMoE`` (``from_pretrained``).

Float checkpoints (bf16 / fp16 / fp32) go through ``FusedMoE.weight_loader`` expert by expert, so a quant
config quantizes each expert as it arrives (docs/design.md §10). The checkpoint layout is the model
type's (``ExpertTensors.transposed``: GPT-OSS and Llama-4 store fused ``[E, H, 2I]`` / ``[E, I, H]``; the
square ``down_proj`` of GPT-OSS is never guessed from its shape), converted here and handed over with
``transposed=False``.

Pre-quantized fp8 e4m3 checkpoints are loaded as they are, without re-quantizing: block scales
(``weight_scale_inv`` ``[ceil(N/bn), ceil(K/bk)]``, DeepSeek-V3's ``weight_block_size``), per-tensor
(``weight_scale`` scalar) or per-channel (``[N]`` / ``[N, 1]``) ``weight_scale``, with ``real = q * scale``.
The layer is built on the meta device and given its final tensors (``convert.assign``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import LoadError
from ...quantization import Fp8Config
from .checkpoint import FP8_DTYPES, Checkpoint, ExpertKey
from .convert import assign, build_layer
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


# ------------------------------------------------------------------------------------------ float
def load_float(path, plan: BlockPlan, keys: BlockKeys, ckpt: Checkpoint, quant_config, device, dtype, bar):
    """A ``FusedMoE`` on ``device`` filled through ``weight_loader`` (quantized online with a quant config)."""
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
            for kind, target in (("weight", "_weight"), ("bias", "_bias")):
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


# ------------------------------------------------------------------------------------------ fp8
def load_fp8(path, plan: BlockPlan, keys: BlockKeys, ckpt: Checkpoint, qc: Fp8Config, device, dtype, bar):
    """A pre-quantized fp8 ``FusedMoE``: the checkpoint's fp8 values and scales, re-arranged, not re-quantized."""
    if plan.moe.get("has_bias"):
        raise LoadError(f"{path}: pre-quantized fp8 experts with biases are not supported")
    layer = build_layer(plan, qc, "meta", dtype)
    layer.layer_name = f"{path}.experts"
    names = ["w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"]
    if plan.correction_bias is not None:
        names.append("e_score_correction_bias")
    out = {n: torch.empty_like(getattr(layer, n), device=device) for n in names}
    I, E = plan.moe["intermediate_size"], plan.num_experts
    missing = []
    for e in range(E):
        got = keys.per_expert.get(e, {})
        for shard in _ORDER:
            wk, sk = got.get((shard, "weight")), got.get((shard, "scale"))
            if wk is None or sk is None:
                missing.append(f"expert {e}: {shard} {'weight' if wk is None else 'scale'}")
                continue
            q, s = ckpt.tensor(wk.name), ckpt.tensor(sk.name).float()
            try:
                _place(out, qc, shard, e, q, s, I)
            except (RuntimeError, ValueError) as exc:
                raise _fail(wk, ckpt, ValueError(f"{layer.layer_name}: {exc}")) from None
            bar.update(q.numel() + s.numel() * 4)
    if plan.correction_bias is not None:
        if keys.correction is None:
            missing.append("e_score_correction_bias")
        else:
            out["e_score_correction_bias"].copy_(ckpt.tensor(keys.correction.name).reshape(-1))
    if missing:
        raise LoadError(f"{layer.layer_name}: the checkpoint is missing routed-expert tensors: {len(missing)} missing: "
                        + "; ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    assign(layer, out)
    return layer


def _place(out: dict, qc: Fp8Config, shard: str, e: int, q: torch.Tensor, s: torch.Tensor, I: int) -> None:
    """Write one checkpoint projection (fp8 ``q`` [N, K], scale ``s``) into the layer's tensors for expert e."""
    w = out["w2_weight" if shard == "w2" else "w13_weight"][e]
    rows = slice(None) if shard == "w2" else (slice(0, I) if shard == "w1" else slice(I, 2 * I))
    if tuple(q.shape) != tuple(w[rows].shape):
        raise ValueError(f"{shard} must be {list(w[rows].shape)}, got {list(q.shape)}")
    w[rows].copy_(q.to(w.dtype))
    scale = out["w2_weight_scale" if shard == "w2" else "w13_weight_scale"]
    if qc.scheme == "tensor":
        if shard == "w2":
            scale[e : e + 1].copy_(s.reshape(1))
        else:
            scale[e, 0 if shard == "w1" else 1] = s.reshape(())
    elif qc.scheme == "channel":
        scale[e][rows].copy_(s.reshape(-1))
    else:
        bn = qc.block_shape[0]
        if shard != "w2" and I % bn:
            raise ValueError(f"fp8 block scales: intermediate_size {I} is not a multiple of the block's {bn} rows, so "
                             "the gate and up tiles do not line up in w13 (re-quantize from a bf16 checkpoint)")
        tiles = slice(None) if shard == "w2" else (slice(0, I // bn) if shard == "w1" else slice(I // bn, 2 * I // bn))
        if tuple(s.shape) != tuple(scale[e][tiles].shape):
            raise ValueError(f"{shard} weight_scale_inv must be {list(scale[e][tiles].shape)} for block "
                             f"{list(qc.block_shape)}, got {list(s.shape)}")
        scale[e][tiles].copy_(s)
