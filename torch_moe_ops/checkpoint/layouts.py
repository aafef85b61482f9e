"""How each model type stores its routed experts in a checkpoint (docs/design.md §11): plain data, no
transformers import. The one home of this knowledge: ``load_checkpoint`` and the transformers integration
both ask it.

- **Per-expert tensors** ``P.experts.{e}.{w1|w3|w2|gate_proj|up_proj|down_proj}.weight`` are ``nn.Linear``
  weights in every model, so ``[out, in]`` by that convention: w1 / w3 ``[I, H]``, w2 ``[H, I]``. Their
  orientation is never guessed.
- **Fused all-experts tensors** (one 3-D tensor per projection) are stored as the model type says:
  ``[E, out, in]`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: transformers v5's fused layout of
  Mixtral, Qwen2/3-MoE, DeepSeek-V3, GLM-4.5, OLMoE, PhiMoE, Ernie-4.5 and Granite's ``input_linear`` /
  ``output_linear``) or transposed ``[E, in, out]`` (GPT-OSS, Llama-4: ``gate_up_proj [E, H, 2I]``,
  ``down_proj [E, I, H]``, which transformers marks ``is_transposed=True``). Square experts (GPT-OSS has
  H = I = 2880) cannot be told apart by shape: only the model type decides.
- **Routing correction bias**: ``P.gate.e_score_correction_bias`` ``[E]`` (DeepSeek-V3, GLM-4.5), Ernie's
  ``P.moe_statics.e_score_correction_bias`` on disk and ``P.gate.moe_statics.e_score_correction_bias`` in
  transformers' modules, both ``[1, E]`` (one expert group).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertFormat:
    """One model type's expert storage. transposed: fused all-experts weights are ``[E, in, out]``."""

    transposed: bool


_UNTRANSPOSED = ExpertFormat(transposed=False)
_TRANSPOSED = ExpertFormat(transposed=True)

#: model_type -> how its checkpoint stores the experts (checked against transformers 5.x modeling files)
FORMATS: dict[str, ExpertFormat] = {
    "mixtral": _UNTRANSPOSED, "qwen2_moe": _UNTRANSPOSED, "qwen3_moe": _UNTRANSPOSED,
    "deepseek_v3": _UNTRANSPOSED, "glm4_moe": _UNTRANSPOSED, "olmoe": _UNTRANSPOSED, "phimoe": _UNTRANSPOSED,
    "ernie4_5_moe": _UNTRANSPOSED,
    # on disk ``block_sparse_moe.input_linear.weight [E, 2I, H]`` / ``output_linear.weight [E, H, I]``
    "granitemoe": _UNTRANSPOSED, "granitemoeshared": _UNTRANSPOSED,
    "gpt_oss": _TRANSPOSED, "llama4": _TRANSPOSED, "llama4_text": _TRANSPOSED,
}

#: children of an MoE block that hold the routing correction bias, most specific first
CORRECTION_BIAS_HOMES = ("gate.moe_statics", "moe_statics", "gate")


def expert_format(model_type: str | None) -> ExpertFormat | None:
    """The format of ``model_type``, or None when it is unknown (or None)."""
    return FORMATS.get(model_type) if isinstance(model_type, str) else None


def fused_transposed(model_type: str | None) -> bool | None:
    """Whether ``model_type`` stores fused all-experts weights ``[E, in, out]``; None when unknown."""
    fmt = expert_format(model_type)
    return None if fmt is None else fmt.transposed


def model_type_of(config) -> str | None:
    """The model type of a config (a transformers ``PretrainedConfig`` or a ``config.json`` dict): its own
    ``model_type`` when known here, else its text config's (multimodal wrappers), else its own, else None."""
    def get(c, key):
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)

    if config is None:
        return None
    own = get(config, "model_type")
    text = get(config, "text_config")
    inner = get(text, "model_type") if text is not None else None
    for cand in (own, inner):
        if isinstance(cand, str) and cand in FORMATS:
            return cand
    return own if isinstance(own, str) and own else None


def correction_bias_prefix(name: str) -> str | None:
    """``P`` of a routing correction bias named ``P.{home}.e_score_correction_bias``, else None."""
    for home in CORRECTION_BIAS_HOMES:
        suffix = f".{home}.e_score_correction_bias"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


__all__ = ["CORRECTION_BIAS_HOMES", "FORMATS", "ExpertFormat", "correction_bias_prefix", "expert_format",
           "fused_transposed", "model_type_of"]
