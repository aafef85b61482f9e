"""``FusedMoE``: the expert layer on top of ``torch.ops.moe`` (docs/design.md §8-§11): module and forward.

No global config or forward context: every op gets its arguments explicitly. The layer is composed of parts it
calls with explicit arguments: ``spec`` (``spec.LayerSpec``, the static facts, checked once; ``layer.top_k``
reads it), its tensors (``storage``: parameters, placement buffers, the dtype guard, ``reset_parameters``,
``load_state_dict``'s checks), ``loader`` (``loading.WeightLoader``: the ``weight_loader`` logic and the load
state, handed the layer's tensors with each call by ``weights``), the input rules (``inputs``), the ops as
pairs (``calls``) and the training rules (``training``). With ``parallel``, the layer holds its placement
tables as buffers and wraps its one experts call (``_run_experts``) in ``distributed.comm.parallel_forward``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import _modes
from ..distributed.config import ParallelConfig
from ..distributed.placement import map_logical_to_physical
from ..errors import LoadError
from . import storage, tables, training, weights
from .calls import FUSED_EXPERTS, FUSED_MOE, TOPK_ROUTE, op
from .inputs import ACTIVATION_DTYPES, INDEX_DTYPES, check_hidden, check_like, restore, tokens
from .loading import Piece, WeightLoader
from .spec import make_spec


def _fact(name: str) -> property:
    """A read-only attribute that is ``layer.spec.<name>`` (the static facts have one home)."""
    return property(lambda self: getattr(self.spec, name))


def experts_keywords(s) -> dict:
    """The keywords of the layer's ``fused_experts`` call that its spec fixes."""
    return dict(activation=s.activation, quant_scheme=s.quant_scheme, block_shape=s.block_shape,
                apply_router_weight_on_input=s.apply_router_weight_on_input, activation_alpha=s.activation_alpha,
                activation_limit=s.activation_limit)


def spec_keywords(s) -> dict:
    """The keywords of the layer's ``fused_moe`` call that its spec fixes: the routing's, then the experts'."""
    return dict(renormalize=s.renormalize, scoring_func=s.scoring_func, num_expert_group=s.num_expert_group,
                topk_group=s.topk_group, routed_scaling_factor=s.routed_scaling_factor, expert_map=None,
                **experts_keywords(s))


class FusedMoE(nn.Module):
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
        batch_invariant: each token's output bitwise independent of the rest of the batch and of the token
            count (docs/batch-invariance.md); None (default) follows ``torch_moe_ops.batch_invariant()`` at each
            call. Settable later: ``layer.batch_invariant = True``.
    """

    # the static facts (``spec.LayerSpec``); ``activation`` / ``quant_scheme`` are the op schemas' strings
    num_experts, top_k, hidden_size = _fact("num_experts"), _fact("top_k"), _fact("hidden_size")
    intermediate_size, intermediate_size_full = _fact("intermediate_size"), _fact("intermediate_size_full")
    params_dtype, quant_config, quant_scheme = _fact("params_dtype"), _fact("quant_config"), _fact("quant_scheme")
    block_shape, has_bias, use_correction_bias = _fact("block_shape"), _fact("has_bias"), _fact("use_correction_bias")
    activation, gated, interleaved = _fact("activation"), _fact("gated"), _fact("interleaved")
    activation_alpha, activation_limit = _fact("activation_alpha"), _fact("activation_limit")
    renormalize, scoring_func, num_expert_group = _fact("renormalize"), _fact("scoring_func"), _fact("num_expert_group")
    topk_group, routed_scaling_factor = _fact("topk_group"), _fact("routed_scaling_factor")
    apply_router_weight_on_input = _fact("apply_router_weight_on_input")
    trainable, save_activations = _fact("trainable"), _fact("save_activations")
    parallel, placement, num_physical_experts = _fact("parallel"), _fact("placement"), _fact("num_physical_experts")
    num_local_experts, local_expert_range = _fact("num_local_experts"), _fact("local_expert_range")

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 params_dtype: torch.dtype = torch.bfloat16, quant_config=None, activation: str = "silu",
                 has_bias: bool = False, renormalize: bool = True, scoring_func: str = "softmax",
                 num_expert_group: int = 0, topk_group: int = 0, use_correction_bias: bool = False,
                 routed_scaling_factor: float = 1.0, apply_router_weight_on_input: bool = False,
                 shared_experts: nn.Module | None = None, device=None, activation_alpha: float | None = None,
                 activation_limit: float | None = None, parallel: ParallelConfig | None = None,
                 trainable: bool = False, save_activations: bool = False, batch_invariant: bool | None = None):
        super().__init__()
        self.batch_invariant = batch_invariant
        self.spec = make_spec(
            num_experts, top_k, hidden_size, intermediate_size, params_dtype=params_dtype, quant_config=quant_config,
            activation=activation, has_bias=has_bias, renormalize=renormalize, scoring_func=scoring_func,
            num_expert_group=num_expert_group, topk_group=topk_group, use_correction_bias=use_correction_bias,
            routed_scaling_factor=routed_scaling_factor, apply_router_weight_on_input=apply_router_weight_on_input,
            activation_alpha=activation_alpha, activation_limit=activation_limit, parallel=parallel,
            trainable=trainable, save_activations=save_activations)
        self.layer_name = ""  #: module path, set by ``load_checkpoint`` / ``finalize_loading`` for messages
        dev = torch.device(device) if device is not None else torch.get_default_device()
        for name, t in storage.make_parameters(self.spec, dev).items():
            self.register_parameter(name, t)
        self.shared_experts = shared_experts
        for name, t in tables.make_buffers(self.spec, dev).items():
            self.register_buffer(name, t, persistent=False)
        self.loader = self._new_loader()  #: the weight_loader logic and streaming state
        self._bind_tensors()
        if trainable:
            training.set_trainable(self)

    @property
    def batch_invariant(self) -> bool | None:
        """True / False: this layer's batch-invariant mode; None: ``torch_moe_ops.batch_invariant()``'s."""
        return self._batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, value: bool | None) -> None:
        _modes.resolve(value)  # TypeError for anything but True, False, None
        self._batch_invariant = value

    def invariant(self) -> bool:
        """The mode of a call now: the layer's setting, else the process-wide switch (Dynamo guards on both)."""
        return _modes.resolve(self._batch_invariant)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [..., H] (at least one leading dim, e.g. [T, H] or [B, S, H]); router_logits:
        [..., E] with the same leading dims -> [..., H] in hidden_states' dtype. Unquantized layers compute
        in ``params_dtype`` (hidden_states must have it); quantized layers take bf16, fp16 or fp32.

        ``shared_experts_input`` (default ``hidden_states``; same leading dims) feeds ``shared_experts``; its
        output is added. Inside, every token tensor is flattened to [T, ...] (a reshape, no host sync)."""
        s = self.spec
        eager = not torch.compiler.is_compiling()
        if not (eager and self._inputs_pass(hidden_states, (router_logits, s.num_experts, ACTIVATION_DTYPES))):
            self._check_ready()
            self._check_input(hidden_states)
            check_like(self._where, router_logits, "router_logits", hidden_states, s.num_experts,
                       f"E={s.num_experts}")
        x, logits = tokens(hidden_states), tokens(router_logits)
        if s.parallel is not None:
            out = self._parallel_experts(x, *self.select_experts(logits))
        elif training.saving(s.save_activations):  # route, then the experts keeping GEMM1's output
            out = training.run_experts_saving(self, x, *self.select_experts(logits))
        else:  # routing and experts in one op (tensors from _parameters: an nn.Module attribute costs ~1 µs eager)
            p = self._parameters
            out = op(FUSED_MOE)(
                x, logits, p["w13_weight"], p["w2_weight"], s.top_k,
                e_score_correction_bias=p["e_score_correction_bias"], w13_scale=p["w13_weight_scale"],
                w2_scale=p["w2_weight_scale"], w13_bias=p["w13_bias"], w2_bias=p["w2_bias"],
                batch_invariant=self.invariant(), **self._keywords(eager)[0])
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
        s = self.spec
        topk_weights, topk_ids = op(TOPK_ROUTE)(
            tokens(router_logits), s.top_k, renormalize=s.renormalize, scoring_func=s.scoring_func,
            num_expert_group=s.num_expert_group, topk_group=s.topk_group,
            e_score_correction_bias=self.e_score_correction_bias, routed_scaling_factor=s.routed_scaling_factor)
        return restore(topk_weights, router_logits), restore(topk_ids, router_logits)

    def forward_experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """The modular form: hidden_states [..., H], topk_weights [..., k], topk_ids [..., k] (same leading
        dims) -> [..., H] (no routing and no shared experts). With ``parallel``, ``topk_ids`` are logical ids."""
        eager = not torch.compiler.is_compiling()
        k = topk_weights.shape[-1] if eager and isinstance(topk_weights, torch.Tensor) and topk_weights.dim() else None
        if k is None or not self._inputs_pass(
                hidden_states, (topk_weights, k, ACTIVATION_DTYPES), (topk_ids, k, INDEX_DTYPES)):
            self._check_ready()
            self._check_input(hidden_states)
            check_like(self._where, topk_weights, "topk_weights", hidden_states, None, "k")
            check_like(self._where, topk_ids, "topk_ids", hidden_states, topk_weights.shape[-1],
                       f"k={topk_weights.shape[-1]} (like topk_weights)")
        x, tw, ids = tokens(hidden_states), tokens(topk_weights), tokens(topk_ids)
        if self.spec.parallel is not None:
            return restore(self._parallel_experts(x, tw, ids), hidden_states)
        return restore(self._run_experts(x, tw, ids), hidden_states)

    def _inputs_pass(self, x, *others) -> bool:
        """Eager: True when every input check of ``forward`` / ``forward_experts`` is sure to pass (a ready layer,
        ``x`` [..., H] in a dtype the layer takes, each of ``others`` — (tensor, its last size, its dtypes) — with
        x's leading dims), read in ~1 µs where the checks take ~13 (CI CPU, session 18). False sends the call
        through the checks, which raise naming what is wrong."""
        w13 = self._parameters["w13_weight"]
        if not isinstance(x, torch.Tensor) or w13.is_meta or not self.loader.streamer.ready:
            return False
        s, shape = self.spec, x.shape
        if len(shape) < 2 or shape[-1] != s.hidden_size:
            return False
        for t, last, dtypes in others:
            if (not isinstance(t, torch.Tensor) or t.shape[:-1] != shape[:-1] or t.shape[-1] != last
                    or t.dtype not in dtypes):
                return False
        return x.dtype == w13.dtype if s.quant_config is None else x.dtype in ACTIVATION_DTYPES

    def _keywords(self, eager: bool) -> tuple[dict, dict]:
        """(``spec_keywords``, ``experts_keywords``) of ``self.spec``; in eager made once per spec object (not under
        Dynamo, which would see an attribute written in forward)."""
        s = self.spec
        if not eager:
            return spec_keywords(s), experts_keywords(s)
        cached = self.__dict__.get("_keywords_cache")
        if cached is None or cached[0] is not s:
            cached = self.__dict__["_keywords_cache"] = (s, (spec_keywords(s), experts_keywords(s)))
        return cached[1]

    def _check_input(self, hidden_states) -> None:
        """[..., H]; the dtype the op needs: the weights' (unquantized) or any of bf16/fp16/fp32 (quantized)."""
        check_hidden(self._where, hidden_states, self.spec.hidden_size,
                     self.w13_weight.dtype if self.spec.quant_config is None else None)

    def _check_ready(self) -> None:
        """Refuse to compute on weights that are not a complete, consistent set: a meta layer (no data), a fresh
        layer (its storage is uninitialised memory), an incomplete load, a torn reload. Python flags and a
        device, never a tensor value: under torch.compile Dynamo guards on them (no host sync)."""
        if self._on_meta() or not self.loader.streamer.ready:
            raise self.loader.not_ready_error(self._on_meta())

    def _run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The layer's one ``fused_experts`` call: x [N, H], topk_weights [N, k] fp32, topk_ids [N, k] (global
        physical ids under EP: other ranks' experts add exactly 0 through ``expert_map``) -> [N, H]."""
        s = self.spec
        if training.saving(s.save_activations):
            return training.run_experts_saving(self, x, topk_weights, topk_ids)
        p = self._parameters  # (as in forward)
        return op(FUSED_EXPERTS)(
            x, p["w13_weight"], p["w2_weight"], topk_weights, topk_ids, w13_scale=p["w13_weight_scale"],
            w2_scale=p["w2_weight_scale"], w13_bias=p["w13_bias"], w2_bias=p["w2_bias"],
            expert_map=self._buffers["expert_map"], batch_invariant=self.invariant(),
            **self._keywords(not torch.compiler.is_compiling())[1])

    def _parallel_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical routing -> an EPLB replica per pair (counted in ``expert_load``) -> dispatch, experts, combine."""
        from ..distributed import comm  # imports torch.distributed: only parallel layers need it

        invariant = self.invariant()  # replicas picked by token content: a token's split never depends on its batch
        ids = map_logical_to_physical(topk_ids, self.logical_to_physical, self.replica_count, x if invariant else None)
        flat = ids.reshape(-1).long()
        self.expert_load.index_add_(0, flat, torch.ones_like(flat))
        return comm.parallel_forward(x, topk_weights, ids, self.spec.parallel, self.expert_owner, self._run_experts,
                                     invariant=invariant)

    # ---------------------------------------------------------------------------------------- EPLB
    def physical_ids(self, logical_id: int) -> list[int]:
        """Global physical slots that hold logical expert ``logical_id`` (``[logical_id]`` without EPLB).
        Checkpoint names address logical experts: load one tensor into each of these."""
        return tables.physical_ids(self.spec, self._buffers, logical_id, self._where)

    def rebalance(self, new_logical_to_physical) -> None:
        """EPLB: move experts (weights, scales, biases) so that physical slot ``p`` holds the logical expert
        ``new_logical_to_physical`` assigns to it ([E_log, max_replicas], -1 padded). Collective: every rank of
        the group calls it with the same table. Storage addresses are kept; ``expert_load`` is reset."""
        tables.rebalance(self.spec, self._parameters, self._buffers, new_logical_to_physical, self._where)

    def _where(self) -> str:
        return self.layer_name or self.spec.label

    def extra_repr(self) -> str:
        return self.spec.describe()

    # ---------------------------------------------------------------------------------------- tensors
    def _on_meta(self) -> bool:
        return self.w13_weight.device.type == "meta"  # a FakeTensor reports its fake device: never meta here

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to`` / ``half`` / ``to_empty`` / ...) with ``storage``'s dtype guard; a layer
        that leaves the meta device is re-initialised (``reset_parameters``). Children get ``fn`` as it is."""
        new_dtype = storage.cast_dtype(fn, self.spec.params_dtype, self.w13_weight.device, self._where)  # raises first
        was_meta = self._on_meta()
        if recurse:
            for module in self.children():
                module._apply(fn)
        guarded, kept = storage.dtype_guard(fn, self._parameters, storage.kept_dtype(self.spec))
        with storage.hidden(self._parameters, kept):
            super()._apply(guarded, recurse=False)
        if new_dtype is not None:
            self._set_params_dtype(new_dtype)
        self._bind_tensors()
        if was_meta and not self._on_meta():
            self.reset_parameters()
        elif not was_meta and self._on_meta():
            self.loader = self._new_loader()  # to("meta"): the data is gone
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise everything except the expert weights and start a fresh load (``load_state`` ``fresh``;
        forward refuses until the weights are loaded again): biases and the correction bias zero, scales one,
        the placement tables as at construction (collective in spirit: every rank resets), ``expert_load`` zero,
        in place (every ``data_ptr`` is kept). ``to_empty`` calls it on a meta-built layer; FSDP /
        torchtitan-style code that calls ``reset_parameters()`` after ``to_empty`` gets the same result."""
        storage.reset(self.spec, self._parameters)
        tables.reset_buffers(self.spec, self._buffers)
        self._bind_tensors()
        self.loader = self._new_loader()

    def __setstate__(self, state) -> None:
        """``copy.deepcopy`` / unpickling: a copied Parameter loses its attributes, so re-attach ``weight_loader``."""
        state.setdefault("_batch_invariant", None)  # (layers pickled before the setting existed)
        super().__setstate__(state)
        storage.attach_weight_loader(self._parameters, self.weight_loader)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` of a saved (possibly quantized) ``FusedMoE`` state counts as a complete load. A
        state of another storage dtype is refused before anything of the layer is written."""
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        problems = storage.state_dict_problems(self.spec, self._parameters, state_dict, prefix, assign, self._where)
        if problems:
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        new_dtype = storage.assigned_dtype(self.spec, self._parameters) if assign else None
        if new_dtype is not None:
            self._set_params_dtype(new_dtype)
        self._bind_tensors()  # assign=True replaced Parameters (also one another layer shared)
        names = [n for n, p in self._parameters.items() if p is not None]
        if not error_msgs and all(prefix + n in state_dict for n in names):
            self.loader.streamer.mark_loaded()

    def _set_params_dtype(self, dtype: torch.dtype) -> None:
        self.spec = dataclasses.replace(self.spec, params_dtype=dtype)
        self.loader.layout = self.spec.layout

    def _bind_tensors(self) -> None:
        """After Parameters were made or replaced: ``weight_loader`` on them, ``full_precision`` from them."""
        storage.attach_weight_loader(self._parameters, self.weight_loader)
        self.full_precision = storage.full_precision(self.spec, self._parameters)

    def _new_loader(self) -> WeightLoader:
        return WeightLoader(self.spec.layout, self.spec.quant_config, self._where)

    # ---------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def weight_loader(self, param, loaded_weight: torch.Tensor, *args, shard_id=weights.UNSET,
                      expert_id=weights.UNSET, weight_name: str | None = None, return_success: bool = False,
                      transposed: bool | None = None):
        """Copy (and, with a quant config, quantize) one checkpoint tensor into the layer (docs/design.md §10.3,
        §11): ``weight_loader(param, loaded_weight, shard_id=None, expert_id=None)`` or vLLM's
        ``weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False)``, each
        positionally or by keyword, also as ``param.weight_loader`` (``weights.convention`` tells them apart).

        Args:
            param: ``w13_weight`` | ``w2_weight`` | ``w13_bias`` | ``w2_bias`` | ``e_score_correction_bias``
                (the parameter, its meta descriptor in ``full_precision``, or its name).
            loaded_weight: bf16/fp16/fp32 on any device. Per expert: w1/w3 [I, H], w2 [H, I]; fused gate_up
                [N1, H] (``shard_id`` None or ``"w13"``, in the layer's row order); with ``expert_id=None`` a
                leading [E] dim (logical experts). Biases drop the last dim. I is the checkpoint's (full) I.
            shard_id: ``"w1"`` (gate; ``up_proj`` of a non-gated layer), ``"w3"`` (up), ``"w2"`` (down).
            expert_id: global physical expert in [0, num_physical_experts), or None (all experts).
            weight_name: the checkpoint name, for messages only (vLLM passes it third).
            transposed: None infers a transposed [in, out] export from a non-square shape; True/False force.

        Checked in full before anything is written (shape, dtype, meta, NaN/Inf, ``expert_id``, a piece loaded
        twice in one round): an error names the layer, expert and shard, and records nothing. A quantized
        projection is written the moment its last shard arrives; after ``finalize_loading`` a new complete set
        re-quantizes in place (reload). Returns, when ``return_success``, whether anything was copied."""
        weight_name, shard_id, expert_id, return_success = weights.convention(
            self._where, args, weight_name, shard_id, expert_id, return_success)
        copied = weights.load_one(self.loader, self._load_targets(), param, loaded_weight, shard_id, expert_id,
                                  weight_name, transposed)
        return copied if return_success else None

    def _check_load(self, param, loaded_weight: torch.Tensor, shard_id=None, expert_id=None, *,
                    transposed: bool | None = None, values: bool = True) -> Piece:
        """Every check of ``weight_loader(param, loaded_weight, shard_id, expert_id, transposed=...)``, writing
        nothing (the first half of a checkpoint-level all-or-nothing load; ``values=False``: shapes only)."""
        return self.loader.check(self._load_targets(), param, loaded_weight, shard_id, expert_id,
                                 transposed=transposed, values=values)

    @torch.no_grad()
    def _write_load(self, piece: Piece, loaded_weight: torch.Tensor) -> bool:
        """Write a piece ``_check_load`` accepted (the second half)."""
        return self.loader.write(self._load_targets(), piece, loaded_weight)

    def _load_targets(self):
        return weights.targets(self._parameters, self.full_precision, self.physical_ids)

    @torch.no_grad()
    def load_weights(self, w13: torch.Tensor, w2: torch.Tensor, *, w13_bias: torch.Tensor | None = None,
                     w2_bias: torch.Tensor | None = None, e_score_correction_bias: torch.Tensor | None = None,
                     finalize: bool = True) -> None:
        """Load whole fused tensors (w13 [E, N1, H], w2 [E, H, I], biases [E, N1] / [E, H], correction
        bias [E]) through the streaming loader, then ``finalize_loading`` (also a reload when loaded).

        All or nothing: every tensor is checked (shapes, dtypes, NaN/Inf) before the first is written, and a
        reload that ``finalize_loading`` would refuse as incomplete is refused before writing."""
        tensors = {"w13_weight": w13, "w2_weight": w2, "w13_bias": w13_bias, "w2_bias": w2_bias,
                   "e_score_correction_bias": e_score_correction_bias}
        weights.load_all(self.loader, self._load_targets(), tensors, reload_check=finalize, where=self._where)
        if finalize:
            self.finalize_loading()

    def finalize_loading(self, *, strict_reload: bool = True) -> str:
        """Close the load round: ``"loaded"``, ``"reloaded"`` or ``"unchanged"``; raises ``LoadError``
        naming every missing (expert, shard). Prefer ``torch_moe_ops.finalize_loading(model)``."""
        result = self.loader.finalize(strict_reload=strict_reload)
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        if meta:
            raise LoadError(f"{self._where()}: parameters still on the meta device after loading: {meta}")
        return result

    def missing_weights(self) -> list[tuple]:
        """``(param, local expert, shard)`` pieces not yet received in the current load (or reload) round."""
        return self.loader.streamer.missing()

    #: ``fresh`` | ``loading`` | ``loaded`` | ``reloading`` | ``torn`` (see ``loading/streamer.py``)
    load_state = property(lambda self: self.loader.streamer.status)
    #: a complete, untorn set is in place (finalize_loading accepted it)
    is_loaded = property(lambda self: self.loader.streamer.loaded)
    #: a reload failed after writing: forward refuses until a complete reload
    is_torn = property(lambda self: self.loader.streamer.torn)
    #: completed load / reload rounds (a reload that received nothing: none)
    load_rounds = property(lambda self: self.loader.streamer.rounds)
    #: high-water mark of this layer's full-precision staging; and the staging alive now (0 after a complete load)
    peak_staging_bytes = property(lambda self: self.loader.streamer.peak_staging_bytes)
    staging_bytes = property(lambda self: self.loader.streamer.staging_bytes)
    #: one local expert's full-precision w13 + w2 in params_dtype
    expert_nbytes = property(lambda self: self.loader.layout.expert_nbytes)


__all__ = ["FusedMoE"]
