"""Hugging Face checkpoint names of MoE experts (docs/design.md §11), parsed without touching a model.

``P`` is the MoE block prefix (``model.layers.3.mlp``, ``…block_sparse_moe``; empty for a bare layer's own
state, ``experts.0.w1.weight``):

- ``P.experts.{e}.{w1|w3|w2}.{weight|bias}`` (Mixtral), ``P.experts.{e}.{gate_proj|up_proj|down_proj}.{weight|bias}``
  (Qwen/DeepSeek; ``up_proj`` is ``w1`` for non-gated activations);
- pre-quantized fp8 siblings of those weights: ``….weight_scale_inv`` (DeepSeek's block scales: the
  multiplier, ``real = q * scale``, despite the name) and ``….weight_scale`` (compressed-tensors / FBGEMM:
  per tensor or per channel), kind ``scale``; ``….input_scale`` (static activation scales), kind
  ``input_scale``;
- ``P.experts.gate_up_proj`` / ``P.experts.down_proj`` (fused [E, N1, H] / [E, H, I], optionally
  ``.weight``; ``_bias`` / ``.bias`` for biases);
- ``P.{input_linear|output_linear}.weight`` (Granite-MoE: fused [E, 2I, H] / [E, H, I], read as
  ``gate_up_proj`` / ``down_proj``);
- ``P.{gate|shared_expert(s)|shared_expert_gate}.*``: children of the MoE block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_EXPERT_RE = re.compile(r"^(?:(?P<prefix>.+?)\.)?experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                        r"\.(?P<kind>weight_scale_inv|weight_scale|input_scale|weight|bias)$")
_FUSED_RE = re.compile(r"^(?:(?P<prefix>.+?)\.)?experts\.(?P<proj>gate_up_proj|down_proj)(?P<suffix>\.weight|\.bias|_bias)?$")
_GRANITE_RE = re.compile(r"^(?P<prefix>.+?)\.(?P<proj>input_linear|output_linear)\.weight$")
_GRANITE_PROJ = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}
BLOCK_CHILD_RE = re.compile(r"^(?P<prefix>.+?)\.(?P<child>gate|shared_experts?|shared_expert_gate)\.(?P<rest>.+)$")
LAYER_INDEX_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_SHARD = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}
#: names a non-gated layer has no parameter for (its single input projection is ``up_proj`` / ``w1``)
_GATE_NAMES = ("gate_proj", "w3")
#: checkpoint suffix -> ExpertName.kind
_KINDS = {"weight": "weight", "bias": "bias", "weight_scale_inv": "scale", "weight_scale": "scale",
          "input_scale": "input_scale"}


@dataclass(frozen=True)
class ExpertName:
    """One expert tensor's name, parsed. expert: the logical expert, or None for a fused all-experts
    tensor. proj: the checkpoint's projection name. kind: ``weight``, ``bias``, ``scale`` (a pre-quantized
    weight's scale) or ``input_scale`` (a static activation scale)."""

    prefix: str
    expert: int | None
    proj: str
    kind: str = "weight"

    @property
    def bias(self) -> bool:
        return self.kind == "bias"

    def shard(self, gated: bool) -> str | None:
        """The loader's ``shard_id`` (None: a fused gate_up tensor); raises ``KeyError`` for a gate projection
        of a non-gated layer (it has none)."""
        if self.expert is None:
            return "w2" if self.proj == "down_proj" else None
        if not gated and self.proj in ("up_proj", "w1"):
            return "w1"  # non-gated: the single input projection
        if not gated and self.proj in _GATE_NAMES:
            raise KeyError(self.proj)
        return _SHARD[self.proj]

    def target(self, shard: str | None) -> str:
        """The ``FusedMoE`` parameter the tensor fills (``input_scale`` fills none: ask ``kind`` first)."""
        suffix = {"bias": "_bias", "scale": "_weight_scale"}.get(self.kind, "_weight")
        return ("w2" if shard == "w2" else "w13") + suffix


def parse_expert_name(name: str) -> ExpertName | None:
    m = _EXPERT_RE.match(name)
    if m is not None:
        return ExpertName(m["prefix"] or "", int(m["expert"]), m["proj"], _KINDS[m["kind"]])
    f = _FUSED_RE.match(name)
    if f is not None:
        return ExpertName(f["prefix"] or "", None, f["proj"], "bias" if f["suffix"] in (".bias", "_bias") else "weight")
    g = _GRANITE_RE.match(name)
    if g is not None:
        return ExpertName(g["prefix"], None, _GRANITE_PROJ[g["proj"]])
    return None
