"""What each supported transformers sparse-MoE block computes, as plain data (``BlockPlan``).

One planner per block class reads the block's own attributes (router settings, expert tensors, shared
experts) and returns the ``FusedMoE`` arguments that compute the same function (docs/design.md §4, §6, §9),
or raises ``Unsupported`` with the reason. Planners never modify the block, so a refused block is left
exactly as it was. The tensors in a plan are the block's own (meta tensors when the model is a skeleton).

Adding a model: write a planner (usually a call of ``_standard``), add it to ``PLANNERS`` under the block's
class name and the model types to ``MODEL_TYPES``; see docs/transformers.md "Adding a model".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...checkpoint.layouts import fused_transposed


class Unsupported(ValueError):
    """This block cannot be computed by torch_moe_ops; the message says why."""


@dataclass
class ExpertTensors:
    """The block's expert weights as stored. ``transposed``: ``w13`` is ``[E, H, N1]`` and ``w2`` ``[E, I, H]``
    (GPT-OSS, Llama-4) instead of ``[E, N1, H]`` / ``[E, H, I]``; gate/up order is the activation's
    (halves, or interleaved for ``swigluoai``). Biases ``[E, N1]`` / ``[E, H]`` in the same row order."""

    w13: torch.Tensor
    w2: torch.Tensor
    transposed: bool = False
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None

    def expert_w13(self, t: torch.Tensor) -> torch.Tensor:
        """One expert's stored w13 (``[N1, H]`` or ``[H, N1]``) -> ``[N1, H]`` (a view)."""
        return t.t() if self.transposed else t

    def expert_w2(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t


@dataclass
class BlockPlan:
    """Everything needed to build the replacement of one block (``block.MoEBlock``) and to load it.

    moe: ``FusedMoE`` keyword arguments (sizes, routing, activation, biases). router_attr: the block's
    name for its router (``gate`` / ``router``), kept so checkpoint and state-dict names stay the same.
    router_fp32: the router runs in fp32 (DeepSeek-V3, GLM-4.5, Ernie). shared: attribute name -> module
    added to the output; shared_gate: the attribute of a sigmoid gate on the shared output (Qwen2-MoE).
    routing: name of a custom routing hook (``block.ROUTINGS``) replacing ``topk_route``. output:
    ``"tensor"`` (same shape as the input), ``"pair"`` (``(out, None)``, GPT-OSS) or ``"flat_pair"``
    (``(out [T, H], router_logits)``, Llama-4)."""

    kind: str
    block_class: str
    moe: dict
    router_attr: str
    router_weight: torch.Tensor
    experts: ExpertTensors
    router_bias: torch.Tensor | None = None
    router_fp32: bool = False
    correction_bias: torch.Tensor | None = None
    shared: dict[str, nn.Module] = field(default_factory=dict)
    shared_gate: str | None = None
    routing: str | None = None
    routing_args: dict = field(default_factory=dict)
    output: str = "tensor"

    @property
    def shared_expert(self) -> str | None:
        """The attribute whose module makes the shared output (the one of ``shared`` that is not the gate)."""
        return next((n for n in self.shared if n != self.shared_gate), None)

    @property
    def num_experts(self) -> int:
        return self.moe["num_experts"]

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.w13.dtype

    def describe(self) -> str:
        """One line for reports: sizes, activation and the routing options that are not the defaults."""
        m = self.moe
        extra = [m.get("scoring_func", "softmax")] + ([] if m.get("renormalize", True) else ["no renormalize"])
        if m.get("num_expert_group"):
            extra.append(f"groups {m['topk_group']}/{m['num_expert_group']}")
        extra += [flag for key, flag in (("use_correction_bias", "correction bias"), ("has_bias", "biases"),
                                         ("apply_router_weight_on_input", "weight on input")) if m.get(key)]
        if m.get("routed_scaling_factor", 1.0) != 1.0:
            extra.append(f"scaling {m['routed_scaling_factor']}")
        if "activation_limit" in m:
            extra.append(f"alpha {m['activation_alpha']} limit {m['activation_limit']}")
        if self.routing:
            extra.append(f"routing {self.routing}")
        if self.shared:
            gate = f" * sigmoid({self.shared_gate})" if self.shared_gate else ""
            extra.append(f"shared {self.shared_expert}{gate}")
        return (f"E={m['num_experts']} top_k={m['top_k']} H={m['hidden_size']} I={m['intermediate_size']} "
                f"{m['activation']}, " + ", ".join(extra))


# ------------------------------------------------------------------------------------------ helpers
#: transformers activation classes (``ACT2FN`` values) -> gated torch_moe_ops activation
_GATED_ACTS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
               "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh"}


def activation_of(act_fn, gated: bool = True) -> str:
    """The torch_moe_ops activation computing ``act_fn(gate) * up`` (gated) or ``act_fn(x)``."""
    name = type(act_fn).__name__
    if not gated:
        base = {"ReLUSquaredActivation": "relu2"}.get(name) or _GATED_ACTS.get(name)
        if base is not None:
            return f"{base}_no_mul"
    elif name in _GATED_ACTS:
        return _GATED_ACTS[name]
    raise Unsupported(f"activation {name} has no torch_moe_ops equivalent (supported: {sorted(_GATED_ACTS)})")


def _param(module: nn.Module, name: str) -> torch.Tensor:
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise Unsupported(f"{type(module).__name__} has no tensor {name!r} (a quantized or modified module?)")
    return t


def _stacked(experts: nn.Module, kind: str, bias: bool = False) -> ExpertTensors:
    """HF's fused 3-D expert tensors ``gate_up_proj`` / ``down_proj`` (+ ``*_bias``), laid out as model type
    ``kind`` stores them (``checkpoint/layouts.py``)."""
    transposed = fused_transposed(kind)
    if transposed is None:
        raise Unsupported(f"model type {kind!r} has no known expert layout (torch_moe_ops.checkpoint.layouts)")
    for flag, want in (("has_gate", True), ("has_post_expert_norm", False), ("_is_expert_parallel", False)):
        if getattr(experts, flag, want) != want:
            raise Unsupported(f"{type(experts).__name__}.{flag}={not want} is not supported")
    w13, w2 = _param(experts, "gate_up_proj"), _param(experts, "down_proj")
    if w13.dim() != 3 or w2.dim() != 3:
        raise Unsupported(f"expected 3-D gate_up_proj / down_proj, got {list(w13.shape)} / {list(w2.shape)}")
    b13 = _param(experts, "gate_up_proj_bias") if bias else None
    b2 = _param(experts, "down_proj_bias") if bias else None
    return ExpertTensors(w13, w2, transposed, b13, b2)


def _sizes(t: ExpertTensors) -> tuple[int, int, int, int]:
    """(E, H, I, N1) from the stored tensors, checking that they agree."""
    E = t.w13.shape[0]
    N1, H = (t.w13.shape[2], t.w13.shape[1]) if t.transposed else (t.w13.shape[1], t.w13.shape[2])
    H2, I = (t.w2.shape[2], t.w2.shape[1]) if t.transposed else (t.w2.shape[1], t.w2.shape[2])
    if t.w2.shape[0] != E or H2 != H or N1 != 2 * I:
        raise Unsupported(f"gate_up_proj {list(t.w13.shape)} and down_proj {list(t.w2.shape)} do not describe "
                          f"E experts of a gated [2I, H] / [H, I] MLP (transposed={t.transposed})")
    return E, H, I, N1


def _standard(kind, block, router_attr, experts: ExpertTensors, top_k, *, activation, renormalize=True,
              scoring_func="softmax", router_bias=None, **extra) -> BlockPlan:
    E, H, I, _ = _sizes(experts)
    router = getattr(block, router_attr)
    moe = dict(num_experts=E, top_k=int(top_k), hidden_size=H, intermediate_size=I, activation=activation,
               renormalize=bool(renormalize), scoring_func=scoring_func)
    moe.update(extra.pop("moe", {}))
    return BlockPlan(kind=kind, block_class=type(block).__name__, moe=moe, router_attr=router_attr,
                     router_weight=_param(router, "weight"), router_bias=router_bias, experts=experts, **extra)


# ------------------------------------------------------------------------------------------ planners
def _topk_softmax(kind, renorm_attr=None):
    """Mixtral / Qwen3-MoE / OLMoE: softmax over E, top-k, optional renormalization (``norm_topk_prob``)."""

    def plan(block, config) -> BlockPlan:
        gate = block.gate
        renorm = True if renorm_attr is None else bool(getattr(gate, renorm_attr))
        return _standard(kind, block, "gate", _stacked(block.experts, kind), gate.top_k, renormalize=renorm,
                         activation=activation_of(block.experts.act_fn))

    return plan


def _qwen2_moe(block, config) -> BlockPlan:
    p = _topk_softmax("qwen2_moe", "norm_topk_prob")(block, config)
    p.shared = {"shared_expert": block.shared_expert, "shared_expert_gate": block.shared_expert_gate}
    p.shared_gate = "shared_expert_gate"
    return p


def _deepseek(kind):
    """DeepSeek-V3 / GLM-4.5: fp32 sigmoid router, correction bias, group-limited top-k, routed scaling."""

    def plan(block, config) -> BlockPlan:
        gate = block.gate
        G, kG = int(gate.num_group), int(gate.topk_group)
        moe = dict(use_correction_bias=True, routed_scaling_factor=float(gate.routed_scaling_factor),
                   num_expert_group=0 if G == 1 else G, topk_group=0 if G == 1 else kG)
        return _standard(kind, block, "gate", _stacked(block.experts, kind), gate.top_k, scoring_func="sigmoid",
                         renormalize=bool(gate.norm_topk_prob), activation=activation_of(block.experts.act_fn),
                         router_fp32=True, correction_bias=_param(gate, "e_score_correction_bias"), moe=moe,
                         shared={"shared_experts": block.shared_experts})

    return plan


def _gpt_oss(block, config) -> BlockPlan:
    """Router with a bias, top-k of the logits then softmax over the k (= softmax + renormalize), expert
    biases, ``swigluoai`` on interleaved gate/up rows with the experts' alpha and clamp limit."""
    ex, router = block.experts, block.router
    moe = dict(has_bias=True, activation_alpha=float(ex.alpha), activation_limit=float(ex.limit))
    return _standard("gpt_oss", block, "router", _stacked(ex, "gpt_oss", bias=True), router.top_k,
                     activation="swigluoai", router_bias=_param(router, "bias"), moe=moe, output="pair")


def _llama4(block, config) -> BlockPlan:
    """Top-k of the logits, sigmoid of the chosen ones (no renormalization), the weight multiplies the
    expert's input (docs/design.md §4), one shared expert; experts stored ``[E, H, 2I]`` (gate/up halves)."""
    router = block.router
    if getattr(router, "bias", None) is not None:
        raise Unsupported("Llama4Router with a bias is not supported")
    return _standard("llama4", block, "router", _stacked(block.experts, "llama4"), router.top_k,
                     scoring_func="sigmoid", renormalize=False, activation=activation_of(block.experts.act_fn),
                     moe=dict(apply_router_weight_on_input=True), shared={"shared_expert": block.shared_expert},
                     output="flat_pair")


def _granite(block, config) -> BlockPlan:
    """Top-k of fp32 logits then softmax over the k: softmax + renormalize."""
    return _standard("granitemoe", block, "router", _stacked(block.experts, "granitemoe"), block.router.top_k,
                     activation=activation_of(block.experts.act_fn))


def _phimoe(block, config) -> BlockPlan:
    """SparseMixer routing (two experts, masked-softmax weights; eval mode) through the ``sparsemixer``
    routing hook; the experts run through ``FusedMoE.forward_experts``."""
    router = block.router
    if getattr(router, "bias", None) is not None:
        raise Unsupported("PhimoeTopKRouter with a bias is not supported")
    p = _standard("phimoe", block, "router", _stacked(block.experts, "phimoe"), 2,
                  activation=activation_of(block.experts.act_fn))
    if p.num_experts < 2:
        raise Unsupported("sparsemixer routing needs at least 2 experts")
    p.routing, p.routing_args = "sparsemixer", {"jitter_eps": float(router.router_jitter_noise)}
    return p


def _ernie(block, config) -> BlockPlan:
    """fp32 softmax router, correction bias (stored ``[1, E]``) for selection, renormalized weights, optional
    shared experts. (Ernie clamps the renormalization denominator at ``moe_norm_min``; the sum of k
    softmax weights is >= k / E, far above it, so the result is the same.)"""
    gate = block.gate
    bias = _param(gate.moe_statics, "e_score_correction_bias")
    shared = {"shared_experts": block.shared_experts} if block.shared_experts is not None else {}
    return _standard("ernie4_5_moe", block, "gate", _stacked(block.experts, "ernie4_5_moe"), gate.top_k,
                     activation=activation_of(block.experts.act_fn), router_fp32=True,
                     correction_bias=bias.reshape(-1), moe=dict(use_correction_bias=True), shared=shared)


#: block class name -> planner(block, text config) -> BlockPlan
PLANNERS = {
    "MixtralSparseMoeBlock": _topk_softmax("mixtral"),
    "Qwen2MoeSparseMoeBlock": _qwen2_moe,
    "Qwen3MoeSparseMoeBlock": _topk_softmax("qwen3_moe", "norm_topk_prob"),
    "OlmoeSparseMoeBlock": _topk_softmax("olmoe", "norm_topk_prob"),
    "DeepseekV3MoE": _deepseek("deepseek_v3"),
    "Glm4MoeMoE": _deepseek("glm4_moe"),
    "GptOssMLP": _gpt_oss,
    "Llama4TextMoe": _llama4,
    "GraniteMoeMoE": _granite,
    "GraniteMoeSharedMoE": _granite,
    "PhimoeSparseMoeBlock": _phimoe,
    "Ernie4_5_MoeSparseMoeBlock": _ernie,
}

#: model_type -> the block classes it uses (from_pretrained's model check and the docs table)
MODEL_TYPES = {
    "mixtral": ("MixtralSparseMoeBlock",), "qwen2_moe": ("Qwen2MoeSparseMoeBlock",),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock",), "olmoe": ("OlmoeSparseMoeBlock",),
    "deepseek_v3": ("DeepseekV3MoE",), "glm4_moe": ("Glm4MoeMoE",), "gpt_oss": ("GptOssMLP",),
    "llama4": ("Llama4TextMoe",), "llama4_text": ("Llama4TextMoe",), "granitemoe": ("GraniteMoeMoE",),
    "granitemoeshared": ("GraniteMoeSharedMoE",), "phimoe": ("PhimoeSparseMoeBlock",),
    "ernie4_5_moe": ("Ernie4_5_MoeSparseMoeBlock",),
}


def plan_block(block: nn.Module, config=None) -> BlockPlan:
    """The plan of a supported block; ``Unsupported`` (with the reason) for anything else."""
    planner = PLANNERS.get(type(block).__name__)
    if planner is None:
        raise Unsupported(f"no torch_moe_ops planner for {type(block).__name__} (supported blocks: {sorted(PLANNERS)})")
    try:
        return planner(block, config)
    except Unsupported:
        raise
    except (AttributeError, TypeError, KeyError) as exc:  # a block class of an unexpected version
        raise Unsupported(f"{type(block).__name__} does not look like the version this planner knows "
                          f"({type(exc).__name__}: {exc})") from None


def looks_like_moe(module: nn.Module) -> bool:
    """Heuristic for MoE blocks nobody planned: an ``experts`` child next to a ``gate`` / ``router``."""
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)
