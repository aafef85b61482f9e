"""Hugging Face checkpoint names of MoE experts (docs/design.md §11), parsed without touching a model: the one
set of expert-name parsers, for ``load_checkpoint`` (``parse_expert_name``) and ``from_pretrained``
(``parse_block_tensor``, which adds the decoder layer and block a name sits in).

``P`` is the MoE block prefix (``model.layers.3.mlp``, ``…block_sparse_moe``; empty for a bare layer's own
state, ``experts.0.w1.weight``):

- ``P.experts.{e}.{w1|w3|w2}.{weight|bias}`` (Mixtral), ``P.experts.{e}.{gate_proj|up_proj|down_proj}.{weight|bias}``
  (Qwen/DeepSeek; ``up_proj`` is ``w1`` for non-gated activations);
- pre-quantized fp8 siblings of those weights: ``….weight_scale_inv`` (DeepSeek's block scales: the
  multiplier, ``real = q * scale``, despite the name) and ``….weight_scale`` (compressed-tensors / FBGEMM:
  per tensor or per channel), kind ``scale``; ``….input_scale`` (static activation scales), kind
  ``input_scale``;
- ``P.experts.gate_up_proj`` / ``P.experts.down_proj`` (fused [E, N1, H] / [E, H, I], optionally
  ``.weight``; ``_bias`` / ``.bias`` for biases; ``_blocks`` / ``_scales``: GPT-OSS's MXFP4, kinds ``mxfp4`` /
  ``mxfp4_scale``, read by ``load_checkpoint`` into ``Mxfp4Config`` layers);
- ``P.{input_linear|output_linear}.weight`` (Granite-MoE: fused [E, 2I, H] / [E, H, I], read as
  ``gate_up_proj`` / ``down_proj``);
- ``P.{gate|shared_expert(s)|shared_expert_gate}.*``: children of the MoE block;
- ``P.{gate|moe_statics|gate.moe_statics}.e_score_correction_bias``: the routing correction bias
  (``layouts.correction_bias_prefix``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .layouts import CORRECTION_BIAS_HOMES

_EXPERT_RE = re.compile(r"^(?:(?P<prefix>.+?)\.)?experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                        r"\.(?P<kind>weight_scale_inv|weight_scale|input_scale|weight|bias)$")
_FUSED_RE = re.compile(r"^(?:(?P<prefix>.+?)\.)?experts\.(?P<proj>gate_up_proj|down_proj)(?P<suffix>\.weight|\.bias|_bias|_blocks|_scales)?$")
_GRANITE_RE = re.compile(r"^(?P<prefix>.+?)\.(?P<proj>input_linear|output_linear)\.weight$")
_GRANITE_PROJ = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}
BLOCK_CHILD_RE = re.compile(r"^(?P<prefix>.+?)\.(?P<child>gate|shared_experts?|shared_expert_gate)\.(?P<rest>.+)$")
LAYER_INDEX_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
#: a block prefix ``P`` directly under a decoder layer: ``{pre = ….layers.L}.{blk}``
_BLOCK_RE = re.compile(r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+))\.(?P<blk>\w+)$")
_SHARD = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}
#: names a non-gated layer has no parameter for (its single input projection is ``up_proj`` / ``w1``)
_GATE_NAMES = ("gate_proj", "w3")
#: checkpoint suffix -> ExpertName.kind
_KINDS = {"weight": "weight", "bias": "bias", "weight_scale_inv": "scale", "weight_scale": "scale",
          "input_scale": "input_scale"}
#: fused-tensor suffix -> ExpertName.kind
_FUSED_KINDS = {None: "weight", ".weight": "weight", ".bias": "bias", "_bias": "bias", "_blocks": "mxfp4",
                "_scales": "mxfp4_scale"}


@dataclass(frozen=True)
class ExpertName:
    """One expert tensor's name, parsed. expert: the logical expert, or None for a fused all-experts
    tensor. proj: the checkpoint's projection name. kind: ``weight``, ``bias``, ``scale`` (a pre-quantized fp8
    weight's scale), ``input_scale`` (a static activation scale), ``mxfp4`` (GPT-OSS's packed ``_blocks``
    ``[E, N, K/32, 16]``) or ``mxfp4_scale`` (their E8M0 ``_scales`` ``[E, N, K/32]``). scale_inv: a scale
    named ``weight_scale_inv`` (DeepSeek's block scales)."""

    prefix: str
    expert: int | None
    proj: str
    kind: str = "weight"
    scale_inv: bool = False

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
        suffix = {"bias": "_bias", "scale": "_weight_scale", "mxfp4_scale": "_weight_scale"}.get(self.kind, "_weight")
        return ("w2" if shard == "w2" else "w13") + suffix


def parse_expert_name(name: str) -> ExpertName | None:
    """The expert tensor ``name`` describes (module docstring), or None for any other name."""
    m = _EXPERT_RE.match(name)
    if m is not None:
        return ExpertName(m["prefix"] or "", int(m["expert"]), m["proj"], _KINDS[m["kind"]],
                          m["kind"] == "weight_scale_inv")
    f = _FUSED_RE.match(name)
    if f is not None:
        return ExpertName(f["prefix"] or "", None, f["proj"], _FUSED_KINDS[f["suffix"]])
    g = _GRANITE_RE.match(name)
    if g is not None:
        return ExpertName(g["prefix"], None, _GRANITE_PROJ[g["proj"]])
    return None


def layer_index(path: str) -> int | None:
    """The decoder layer ``L`` of a name or module path (its last ``layers.L``), or None."""
    found = LAYER_INDEX_RE.findall(path)
    return int(found[-1]) if found else None


#: checkpoint projection -> the block-level shard of ``BlockTensor`` (gated layers; ``w13``: fused gate_up)
_BLOCK_SHARD = dict(_SHARD, gate_up_proj="w13")


@dataclass(frozen=True)
class BlockTensor:
    """A routed-expert tensor of a block directly under a decoder layer: ``{pre}.{blk}.…`` with ``pre`` ending
    in ``layers.{layer}``. expert: None for a fused all-experts tensor and the correction bias. shard: ``w1``
    (gate), ``w3`` (up), ``w2`` (down), ``w13`` (fused gate_up) or ``correction``. kind: as ``ExpertName``'s
    (the correction bias: ``bias``). scale_inv: a ``weight_scale_inv``."""

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


def parse_block_tensor(name: str) -> BlockTensor | None:
    """``parse_expert_name`` (or the correction bias) of a block directly under ``layers.{L}``; None for any
    other name (another tensor, or expert-like names elsewhere)."""
    parsed = parse_expert_name(name)
    if parsed is not None:
        m = _BLOCK_RE.match(parsed.prefix)
        if m is None:
            return None
        return BlockTensor(name, m["pre"], int(m["layer"]), m["blk"], parsed.expert, _BLOCK_SHARD[parsed.proj],
                           parsed.kind, parsed.scale_inv)
    for home in CORRECTION_BIAS_HOMES:
        suffix = f".{home}.e_score_correction_bias"
        m = _BLOCK_RE.match(name[: -len(suffix)]) if name.endswith(suffix) else None
        if m is not None:
            return BlockTensor(name, m["pre"], int(m["layer"]), m["blk"], None, "correction", "bias")
    return None


__all__ = ["BLOCK_CHILD_RE", "LAYER_INDEX_RE", "BlockTensor", "ExpertName", "layer_index", "parse_block_tensor",
           "parse_expert_name"]
