"""``FusedMoE``: the expert layer on top of ``torch.ops.moe`` (docs/design.md §8-§11): module and forward.

The layer needs no global config or forward context: every op gets its arguments explicitly. Parameters:

- ``w13_weight`` [E, N1, H] (gated: N1 = 2I, rows [0, I) gate, [I, 2I) up, interleaved for ``swigluoai``;
  N1 = I for ``*_no_mul``); ``w2_weight`` [E, H, I]. With a quant config these hold the format's storage
  (``quant_config.storage_shape``: fp8 / int8 ``[E, N, K]``, int4 two per byte ``[E, N, K // 2]`` uint8),
  allocated on the target device at construction, at their final addresses.
- ``w13_weight_scale`` / ``w2_weight_scale`` (fp32, quantized only): ``quant_config.scale_shape`` (docs/design.md
  §3): fp8 tensor ``[E, 2]`` (gate, up; ``[E, 1]`` interleaved or non-gated) and ``[E]``; channel ``[E, N1]``
  and ``[E, H]``; fp8 block ``[E, ceil(N1/bn), ceil(H/bk)]`` and ``[E, ceil(H/bn), ceil(I/bk)]``; int4
  ``[E, N1, H // G]`` and ``[E, H, I // G]``.
- ``w13_bias`` [E, N1], ``w2_bias`` [E, H] (``has_bias``), ``e_score_correction_bias`` [E] fp32.

Loading (``weight_loader`` and the load state, methods of ``layer_loading.LoadingMethods``) is done by
``loading.WeightLoader``; full-precision weights of a quantized layer exist only as meta tensors
(``layer.full_precision``) and in per-expert staging while they load. The tensors' registration, ``to_empty``
/ dtype casts and ``reset_parameters`` are ``layer_tensors.TensorMethods``; the input rules (any leading
dims, the activation dtype) are ``layer_inputs``. With
``parallel``, the layer holds its placement tables as buffers and wraps its one experts call
(``_run_experts``) in ``distributed.comm.parallel_forward``. With ``trainable=True`` the full-precision weights
and the biases require grad (docs/training.md; ``torch_moe_ops.training`` holds the rules).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops, training
from .distributed.config import ParallelConfig
from .distributed.placement import map_logical_to_physical
from .distributed.plan import plan
from .layer_inputs import check_hidden, check_like, restore, tokens
from .layer_tensors import TensorMethods
from .layer_loading import LoadingMethods
from .loading import ExpertLayout, WeightLoader
from .schemes.configs import check_quant_config
from .schemes import NONE, SCORING_FUNCS, get_activation


def _op(name: str):
    """The op ``name``: its public function in eager (which calls the CUDA kernel without the dispatcher when
    nothing else would happen there: docs/host-overhead.md), ``torch.ops.moe.<name>`` under Dynamo (a Python
    function there would be one more frame for Dynamo to compile after a graph break)."""
    return getattr(torch.ops.moe, name) if torch.compiler.is_compiling() else getattr(ops, name)


#: moved by EPLB rebalance, one row per local slot
_PER_EXPERT = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias")


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FusedMoE(LoadingMethods, TensorMethods, nn.Module):
    """Routed experts: ``forward(hidden_states [..., H], router_logits [..., E]) -> [..., H]``.

    Args:
        num_experts, top_k, hidden_size, intermediate_size: E, k, H and I (per partition).
        params_dtype: full-precision dtype (bf16/fp16/fp32): unquantized weights, biases, staging.
        quant_config: None, ``Fp8Config(scheme=...)``, ``Int8Config()``, ``Int4Config(group_size=G)``, or a
            scheme name standing for its default config (``"fp8_block"``, ``"int8_w8a16"``, ``"int4_w4a16"``);
            weights are then quantized online, expert by expert, as the loader receives them.
        activation: see ``fused_experts``; ``*_no_mul`` activations give ``w13_weight [E, I, H]``.
        has_bias: add ``w13_bias`` / ``w2_bias`` (loaded with the weights, zero-initialised).
        renormalize, scoring_func, num_expert_group, topk_group, routed_scaling_factor: routing (§4).
        use_correction_bias: add ``e_score_correction_bias [E]`` fp32 (DeepSeek-V3 selection bias).
        apply_router_weight_on_input: scale the GEMM1 input by the router weight (§4).
        shared_experts: optional module added to the output: ``shared_experts(shared_experts_input)``.
        device: target device (default: ``torch.get_default_device()``). A layer built on ``meta`` gets its
            storage from ``model.to_empty(device=...)``, then loads as usual (docs/design.md §10.1).
        activation_alpha, activation_limit: swigluoai's alpha and the clamp limit; None takes the
            activation's default (docs/design.md §6: limit on for swigluoai only; > 0 clamps silu/gelu too).
        parallel: ``torch_moe_ops.ParallelConfig`` for tensor / expert parallelism over ``torch.distributed``
            (see ``docs/distributed.md``). With it, ``num_experts`` is the number of logical experts and
            ``intermediate_size`` the full (checkpoint) I; the layer holds only its local physical experts
            (``num_local_experts``) and its ``I / tp_size`` slice (``intermediate_size``).
        trainable: ``w13_weight`` / ``w2_weight`` (unquantized layers) and the biases require grad; quantized
            weights, their scales and ``e_score_correction_bias`` stay frozen (docs/training.md). Not with
            ``parallel.world_size > 1``.
        save_activations: (``trainable`` only) keep GEMM1's output for the backward instead of recomputing
            it: ``2·k·N1`` bytes per token in bf16 (docs/training.md, "Memory and compute").
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 params_dtype: torch.dtype = torch.bfloat16, quant_config=None, activation: str = "silu",
                 has_bias: bool = False, renormalize: bool = True, scoring_func: str = "softmax",
                 num_expert_group: int = 0, topk_group: int = 0, use_correction_bias: bool = False,
                 routed_scaling_factor: float = 1.0, apply_router_weight_on_input: bool = False,
                 shared_experts: nn.Module | None = None, device=None, activation_alpha: float | None = None,
                 activation_limit: float | None = None, parallel: ParallelConfig | None = None,
                 trainable: bool = False, save_activations: bool = False):
        super().__init__()
        training.check_trainable(trainable, save_activations, parallel)
        for name, value in (("num_experts", num_experts), ("top_k", top_k), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            _positive(name, value)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if params_dtype not in (torch.bfloat16, torch.float16, torch.float32):
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
        qc = self.quant_config = check_quant_config(quant_config)
        act = get_activation(activation)
        self.activation = act.name  #: the op schemas' string
        self.gated, self.interleaved = act.gated, act.interleaved
        self.activation_alpha = act.alpha(activation_alpha)
        self.activation_limit = act.limit(activation_limit)
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size_full = hidden_size, intermediate_size
        self.params_dtype = params_dtype
        self.has_bias, self.use_correction_bias = has_bias, use_correction_bias
        self.renormalize, self.scoring_func = renormalize, scoring_func
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.trainable, self.save_activations = trainable, save_activations
        self.layer_name = ""  #: module path, set by ``load_checkpoint`` / ``finalize_loading`` for messages
        self.quant_scheme = (qc.quant_scheme if qc is not None else NONE).name  #: fused_experts' quant_scheme
        self.block_shape = None if qc is None else qc.kernel_block_shape
        dev = torch.device(device) if device is not None else torch.get_default_device()

        # placement: which experts and which I slice live here (checked before the process group is asked)
        self.parallel = parallel
        self.placement = plan(parallel, num_experts, intermediate_size) if parallel is not None else None
        pl = self.placement
        E_g = num_experts if pl is None else pl.num_physical
        self.num_physical_experts = E_g
        self.num_local_experts = num_experts if pl is None else pl.num_local
        self.local_expert_range = (0, num_experts) if pl is None else pl.local_range
        self.intermediate_size = I = intermediate_size if pl is None else pl.intermediate
        if qc is not None:
            err = qc.tp_shard_error(I) if pl is not None and pl.tp_size > 1 else None
            if err is not None:
                raise ValueError(f"{self._where()}: {err}")
            qc.check_dims(self._where(), hidden_size=hidden_size, intermediate_size=I)
        if parallel is not None and parallel.world_size > 1:
            parallel.check_group()

        E, H, N1 = self.num_local_experts, hidden_size, act.n1(I)
        layout = ExpertLayout(
            num_experts=num_experts, num_physical=E_g, hidden_size=H, intermediate_full=intermediate_size,
            intermediate=I, activation=act, params_dtype=params_dtype, has_bias=has_bias,
            correction_bias=use_correction_bias, local_slots=None if pl is None else pl.local_slots,
            tp_rank=0 if pl is None else pl.tp_rank, tp_size=1 if pl is None else pl.tp_size)
        self.loader = WeightLoader(layout, qc, self._where)  #: the weight_loader logic and streaming state
        self._register_weights(E, N1, H, I, dev)
        self.shared_experts = shared_experts
        self._register_tables(dev)
        if trainable:
            training.set_trainable(self)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [..., H] (at least one leading dim, e.g. [T, H] or [B, S, H]); router_logits:
        [..., E] with the same leading dims -> [..., H] in hidden_states' dtype. Unquantized layers compute
        in ``params_dtype`` (hidden_states must have it); quantized layers take bf16, fp16 or fp32.

        ``shared_experts_input`` (default ``hidden_states``; same leading dims) feeds ``shared_experts``; its
        output is added. Inside, every token tensor is flattened to [T, ...] (a reshape, no host sync)."""
        self._check_ready()
        self._check_input(hidden_states)
        check_like(self._where, router_logits, "router_logits", hidden_states, self.num_experts, f"E={self.num_experts}")
        x, logits = tokens(hidden_states), tokens(router_logits)
        if self.parallel is None and self._saving():  # route, then the experts keeping GEMM1's output
            out = training.run_experts_saving(self, x, *self.select_experts(logits))
        elif self.parallel is None:  # routing and experts in one op
            out = _op("fused_moe")(
                x, logits, self.w13_weight, self.w2_weight, self.top_k, renormalize=self.renormalize,
                scoring_func=self.scoring_func, num_expert_group=self.num_expert_group, topk_group=self.topk_group,
                e_score_correction_bias=self.e_score_correction_bias, routed_scaling_factor=self.routed_scaling_factor,
                activation=self.activation, quant_scheme=self.quant_scheme, w13_scale=self.w13_weight_scale,
                w2_scale=self.w2_weight_scale, w13_bias=self.w13_bias, w2_bias=self.w2_bias,
                block_shape=self.block_shape, expert_map=None,
                apply_router_weight_on_input=self.apply_router_weight_on_input,
                activation_alpha=self.activation_alpha, activation_limit=self.activation_limit)
        else:
            out = self._parallel_experts(x, *self.select_experts(logits))
        out = restore(out, hidden_states)
        if self.shared_experts is not None:
            if shared_experts_input is None:
                shared_experts_input = hidden_states
            else:
                check_like(self._where, shared_experts_input, "shared_experts_input", hidden_states, None, "*")
            out = out + self.shared_experts(shared_experts_input)
        return out

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits: [..., E] -> (topk_weights [..., k] fp32, topk_ids [..., k] int32)."""
        weights, ids = _op("topk_route")(
            tokens(router_logits), self.top_k, renormalize=self.renormalize, scoring_func=self.scoring_func,
            num_expert_group=self.num_expert_group, topk_group=self.topk_group,
            e_score_correction_bias=self.e_score_correction_bias, routed_scaling_factor=self.routed_scaling_factor)
        return restore(weights, router_logits), restore(ids, router_logits)

    def forward_experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """The modular form: hidden_states [..., H], topk_weights [..., k], topk_ids [..., k] (same leading
        dims) -> [..., H] (no routing and no shared experts). With ``parallel``, ``topk_ids`` are logical ids."""
        self._check_ready()
        self._check_input(hidden_states)
        check_like(self._where, topk_weights, "topk_weights", hidden_states, None, "k")
        check_like(self._where, topk_ids, "topk_ids", hidden_states, topk_weights.shape[-1],
                   f"k={topk_weights.shape[-1]} (like topk_weights)")
        x, weights, ids = tokens(hidden_states), tokens(topk_weights), tokens(topk_ids)
        if self.parallel is not None:
            return restore(self._parallel_experts(x, weights, ids), hidden_states)
        return restore(self._run_experts(x, weights, ids), hidden_states)

    def _check_input(self, hidden_states) -> None:
        """[..., H]; the dtype the op needs: the weights' (unquantized) or any of bf16/fp16/fp32 (quantized)."""
        check_hidden(self._where, hidden_states, self.hidden_size,
                     self.w13_weight.dtype if self.quant_config is None else None)

    def _run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The layer's one ``fused_experts`` call: x [N, H], topk_weights [N, k] fp32, topk_ids [N, k] (global
        physical ids under EP: other ranks' experts add exactly 0 through ``expert_map``) -> [N, H]."""
        if self._saving():
            return training.run_experts_saving(self, x, topk_weights, topk_ids)
        return _op("fused_experts")(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, activation=self.activation,
            quant_scheme=self.quant_scheme, w13_scale=self.w13_weight_scale, w2_scale=self.w2_weight_scale,
            w13_bias=self.w13_bias, w2_bias=self.w2_bias, block_shape=self.block_shape, expert_map=self.expert_map,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
            activation_alpha=self.activation_alpha, activation_limit=self.activation_limit)

    def _parallel_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical routing -> an EPLB replica per pair (counted in ``expert_load``) -> dispatch, experts, combine."""
        from .distributed import comm  # imports torch.distributed: only parallel layers need it

        ids = map_logical_to_physical(topk_ids, self.logical_to_physical, self.replica_count)
        flat = ids.reshape(-1).long()
        self.expert_load.index_add_(0, flat, torch.ones_like(flat))
        return comm.parallel_forward(x, topk_weights, ids, self.parallel, self.expert_owner, self._run_experts)

    def _saving(self) -> bool:
        """The saving forward (docs/training.md) only when a backward may follow."""
        return self.save_activations and torch.is_grad_enabled()

    # ---------------------------------------------------------------------------------------- EPLB
    def physical_ids(self, logical_id: int) -> list[int]:
        """Global physical slots that hold logical expert ``logical_id`` (``[logical_id]`` without EPLB).
        Checkpoint names address logical experts: load one tensor into each of these."""
        if self.parallel is None:
            return [logical_id]
        if not isinstance(logical_id, int) or not 0 <= logical_id < self.num_experts:
            raise ValueError(f"{self._where()}: logical expert id must be an int in [0, {self.num_experts}), "
                             f"got {logical_id!r}")
        return [p for p in self.logical_to_physical[logical_id].tolist() if p >= 0]  # host-ok: loading-time lookup, not a forward path

    def rebalance(self, new_logical_to_physical) -> None:
        """EPLB: move experts (weights, scales, biases) so that physical slot ``p`` holds the logical expert
        ``new_logical_to_physical`` assigns to it ([E_log, max_replicas], -1 padded). Collective: every rank of
        the group calls it with the same table. Storage addresses are kept; ``expert_load`` is reset."""
        if self.parallel is None:
            raise RuntimeError(f"{self._where()}: rebalance needs parallel=ParallelConfig(...)")
        from .distributed import eplb  # imports torch.distributed

        moved = [t for t in (getattr(self, n) for n in _PER_EXPERT) if t is not None]
        tables = eplb.EplbTables(self.physical_to_logical, self.logical_to_physical, self.replica_count,
                                 self.expert_owner)
        eplb.rebalance(moved, new_logical_to_physical, tables, self.parallel, self.placement.local_slots)
        self.expert_load.zero_()

    def _where(self) -> str:
        return self.layer_name or f"FusedMoE(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size})"

    def extra_repr(self) -> str:
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
            parts.append(f"tp={pc.tp_rank}/{pc.tp_size}, ep={pc.ep_rank}/{pc.ep_size}, "
                         f"local_experts={self.num_local_experts}, redundant={pc.num_redundant_experts}, mode={pc.mode!r}")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"routed_scaling_factor={self.routed_scaling_factor}")
        if self.trainable:
            parts.append("trainable=True" + (", save_activations=True" if self.save_activations else ""))
        return ", ".join(parts)


__all__ = ["FusedMoE"]
