"""Streaming one block's routed experts from the checkpoint into its ``FusedMoE`` (``from_pretrained``).

Float checkpoints (bf16 / fp16 / fp32) go through ``FusedMoE.weight_loader`` expert by expert, so a quant
config quantizes each expert as it arrives (docs/design.md §10). The checkpoint layout is the model
type's (``ExpertTensors.transposed``: GPT-OSS and Llama-4 store fused ``[E, H, 2I]`` / ``[E, I, H]``; the
square ``down_proj`` of GPT-OSS is never guessed from its shape), converted here and handed over with
``transposed=False``.

Pre-quantized fp8 e4m3 checkpoints take the same path: their weights and scales are ``weight_loader``
pieces of a layer whose ``Fp8Config`` matches the checkpoint (``checkpoint/formats.py`` decides it: block
``weight_scale_inv`` with DeepSeek-V3's ``weight_block_size``, per-tensor or per-channel ``weight_scale``),
written as they are, never re-quantized (the piece rules: ``layer/loading/prequantized.py``); so are GPT-OSS's
MXFP4 ``*_blocks`` / ``*_scales`` into ``Mxfp4Config`` layers. Tensors are read through the one safetensors reader
(``checkpoint.files.SafetensorsFiles``), one expert at a time.
"""
from __future__ import annotations

from ...checkpoint.files import SafetensorsFiles
from ...checkpoint.formats import mxfp4_packed
from ...checkpoint.names import BlockTensor
from ...errors import LoadError
from .checkpoint import BlockKeys
from .convert import build_layer
from .models import BlockPlan

_ORDER = ("w1", "w3", "w2")


def _fail(key: BlockTensor, ckpt: SafetensorsFiles, exc: Exception) -> Exception:
    return type(exc)(f"checkpoint tensor {key.name} ({ckpt.file(key.name)}): {exc}")


def load_experts(path, plan: BlockPlan, keys: BlockKeys, ckpt: SafetensorsFiles, quant_config, device, dtype, bar):
    """A ``FusedMoE`` on ``device`` filled through ``weight_loader``: float weights quantized online with a
    quant config, or (``quant_config`` from ``checkpoint.formats.detect_fp8``) a pre-quantized checkpoint's fp8
    weights and scales."""
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
                if kind == "mxfp4":  # GPT-OSS's packed bytes [N, K/32, 16] -> [N, K/2], [out, in] as stored
                    load(key, prefix + "_weight", mxfp4_packed(t, 2), shard_id, e, transposed=False)
                elif kind == "mxfp4_scale":
                    load(key, prefix + "_weight_scale", t, shard_id, e)
                elif kind == "weight":
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
