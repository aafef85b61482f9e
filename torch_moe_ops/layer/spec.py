"""``LayerSpec``: the static facts of one ``FusedMoE``, checked once at construction (docs/design.md §2-§5).

The layer's parts take the spec as an argument instead of reading the layer: ``storage`` shapes its tensors
from it, the loader gets its ``layout``, the forward reads its routing and expert options. It is frozen;
only ``params_dtype`` follows a dtype cast (``dataclasses.replace``: the layer then holds a new spec).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..distributed.config import ParallelConfig
from ..distributed.plan import Placement, plan
from ..schemes import NONE, SCORING_FUNCS, Activation, get_activation
from ..schemes.configs import QuantConfig, check_quant_config
from .loading import ExpertLayout

PARAMS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """What one layer is, without tensors. Sizes: E = ``num_experts`` (logical, the router's width), k =
    ``top_k``, H = ``hidden_size``, I = ``intermediate_size`` (this rank's: the checkpoint's
    ``intermediate_size_full / tp_size``); the local weights are w13 [``num_local_experts``, N1, H] (N1 = 2I
    gated, I otherwise) and w2 [``num_local_experts``, H, I]. ``act`` is the registry's ``Activation``;
    ``activation`` / ``quant_scheme`` / ``block_shape`` are the strings and list the ops take."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size_full: int
    intermediate_size: int
    act: Activation
    activation_alpha: float
    activation_limit: float
    params_dtype: torch.dtype
    quant_config: QuantConfig | None
    has_bias: bool
    use_correction_bias: bool
    renormalize: bool
    scoring_func: str
    num_expert_group: int
    topk_group: int
    routed_scaling_factor: float
    apply_router_weight_on_input: bool
    parallel: ParallelConfig | None
    placement: Placement | None
    trainable: bool
    save_activations: bool
    # the op arguments, derived once (read by every forward)
    activation: str = dataclasses.field(init=False)
    quant_scheme: str = dataclasses.field(init=False)
    block_shape: list[int] | None = dataclasses.field(init=False)

    def __post_init__(self):
        qc = self.quant_config
        object.__setattr__(self, "activation", self.act.name)
        object.__setattr__(self, "quant_scheme", (qc.quant_scheme if qc is not None else NONE).name)
        object.__setattr__(self, "block_shape", None if qc is None else qc.kernel_block_shape)

    # -------------------------------------------------------------------------------------- derived
    @property
    def gated(self) -> bool:
        return self.act.gated

    @property
    def interleaved(self) -> bool:
        return self.act.interleaved

    @property
    def n1(self) -> int:
        """Rows of w13: 2I gated, I otherwise."""
        return self.act.n1(self.intermediate_size)

    @property
    def num_physical_experts(self) -> int:
        """E plus the EPLB replicas: the global physical slots."""
        return self.num_experts if self.placement is None else self.placement.num_physical

    @property
    def num_local_experts(self) -> int:
        return self.num_experts if self.placement is None else self.placement.num_local

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """``[start, end)`` of the global physical slots this rank holds."""
        return (0, self.num_experts) if self.placement is None else self.placement.local_range

    @property
    def layout(self) -> ExpertLayout:
        """The loader's view: shapes and placement as plain data."""
        pl = self.placement
        return ExpertLayout(
            num_experts=self.num_experts, num_physical=self.num_physical_experts, hidden_size=self.hidden_size,
            intermediate_full=self.intermediate_size_full, intermediate=self.intermediate_size, activation=self.act,
            params_dtype=self.params_dtype, has_bias=self.has_bias, correction_bias=self.use_correction_bias,
            local_slots=None if pl is None else pl.local_slots, tp_rank=0 if pl is None else pl.tp_rank,
            tp_size=1 if pl is None else pl.tp_size)

    @property
    def label(self) -> str:
        """The layer's name in messages until ``layer_name`` is set."""
        return f"FusedMoE(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size})"

    def describe(self) -> str:
        """``FusedMoE.extra_repr``."""
        parts = [f"num_experts={self.num_experts}", f"top_k={self.top_k}", f"hidden_size={self.hidden_size}",
                 f"intermediate_size={self.intermediate_size}", f"activation={self.activation!r}",
                 f"quant_scheme={self.quant_scheme!r}", f"params_dtype={self.params_dtype}"]
        if self.block_shape is not None:
            parts.append(f"block_shape={self.block_shape}")
        if self.has_bias:
            parts.append("has_bias=True")
        if self.num_expert_group:
            parts.append(f"num_expert_group={self.num_expert_group}, topk_group={self.topk_group}")
        if self.use_correction_bias:
            parts.append("use_correction_bias=True")
        if self.parallel is not None:
            pc = self.parallel
            parts.append(f"tp={pc.tp_rank}/{pc.tp_size}, ep={pc.ep_rank}/{pc.ep_size}, local_experts="
                         f"{self.num_local_experts}, redundant={pc.num_redundant_experts}, mode={pc.mode!r}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"routed_scaling_factor={self.routed_scaling_factor}")
        if self.trainable:
            parts.append("trainable=True" + (", save_activations=True" if self.save_activations else ""))
        return ", ".join(parts)


def check_trainable(trainable: bool, save_activations: bool, parallel) -> None:
    """Constructor checks of ``FusedMoE(trainable=..., save_activations=...)``."""
    if save_activations and not trainable:
        raise ValueError("save_activations=True only applies to trainable=True layers")
    if trainable and parallel is not None and parallel.world_size > 1:
        raise NotImplementedError("trainable=True with tensor / expert parallelism (world_size > 1) is not "
                                  "supported yet: the expert exchange is not differentiable (docs/training.md)")


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def make_spec(num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *, params_dtype, quant_config,
              activation: str, has_bias: bool, renormalize: bool, scoring_func: str, num_expert_group: int,
              topk_group: int, use_correction_bias: bool, routed_scaling_factor: float,
              apply_router_weight_on_input: bool, activation_alpha, activation_limit, parallel, trainable: bool,
              save_activations: bool) -> LayerSpec:
    """Check ``FusedMoE``'s arguments (its docstring documents them) and resolve them: the activation and the
    quant config into registry objects, ``parallel`` into this rank's ``Placement`` (checked before the
    process group is asked). Raises ``ValueError`` / ``TypeError`` naming the argument."""
    check_trainable(trainable, save_activations, parallel)
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
        _positive(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if params_dtype not in PARAMS_DTYPES:
        raise TypeError(f"params_dtype must be bfloat16, float16 or float32, got {params_dtype}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if num_expert_group or topk_group:
        G, kG = num_expert_group, topk_group
        if not (G > 0 and num_experts % G == 0 and num_experts > G and 1 <= kG <= G
                and top_k <= kG * (num_experts // G)):
            raise ValueError(f"grouped top-k needs num_expert_group G | E, E > G, 1 <= topk_group <= G and "
                             f"top_k <= topk_group * E / G; got E={num_experts}, G={G}, topk_group={kG}, "
                             f"top_k={top_k}")
    qc = check_quant_config(quant_config)
    act = get_activation(activation)
    placement = plan(parallel, num_experts, intermediate_size) if parallel is not None else None
    spec = LayerSpec(
        num_experts=num_experts, top_k=top_k, hidden_size=hidden_size, intermediate_size_full=intermediate_size,
        intermediate_size=intermediate_size if placement is None else placement.intermediate, act=act,
        activation_alpha=act.alpha(activation_alpha), activation_limit=act.limit(activation_limit),
        params_dtype=params_dtype, quant_config=qc, has_bias=has_bias, use_correction_bias=use_correction_bias,
        renormalize=renormalize, scoring_func=scoring_func, num_expert_group=num_expert_group, topk_group=topk_group,
        routed_scaling_factor=float(routed_scaling_factor), apply_router_weight_on_input=apply_router_weight_on_input,
        parallel=parallel, placement=placement, trainable=trainable, save_activations=save_activations)
    if qc is not None:
        err = qc.tp_shard_error(spec.intermediate_size) if placement is not None and placement.tp_size > 1 else None
        if err is not None:
            raise ValueError(f"{spec.label}: {err}")
        qc.check_dims(spec.label, hidden_size=hidden_size, intermediate_size=spec.intermediate_size)
    if parallel is not None and parallel.world_size > 1:
        parallel.check_group()
    return spec


__all__ = ["PARAMS_DTYPES", "LayerSpec", "check_trainable", "make_spec"]
