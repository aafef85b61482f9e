"""``FusedMoE``: the expert layer on top of ``torch.ops.moe`` with streaming online quantization (spec §9-§11).

The layer needs no global config or forward context: every op gets its arguments explicitly. Parameters:

- ``w13_weight`` [E, 2I, H] (gated; rows [0, I) gate, [I, 2I) up; interleaved for ``swigluoai``) or
  [E, I, H] (``*_no_mul``); ``w2_weight`` [E, H, I]. With a quant config these hold fp8 (int8) data and
  are allocated on the target device at construction, at their final addresses.
- ``w13_weight_scale`` / ``w2_weight_scale`` (fp32, quantized only): fp8 tensor ``[E, 2]`` (gate, up;
  ``[E, 1]`` for interleaved or non-gated) and ``[E]``; channel ``[E, N1]`` and ``[E, H]``; block
  ``[E, ceil(N1/bn), ceil(H/bk)]`` and ``[E, ceil(H/bn), ceil(I/bk)]``.
- ``w13_bias`` [E, N1], ``w2_bias`` [E, H] (``has_bias``), ``e_score_correction_bias`` [E] fp32.

Full-precision weights of a quantized layer exist only as meta tensors (``layer.full_precision``); real
full-precision data lives in per-expert staging while it is loaded, and is freed as soon as that expert's
projection is quantized (see ``quantization/online.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from ._spec import SCORING_FUNCS, canonical_activation, is_gated
from .ops import quantize_weight_into
from .quantization.config import check_quant_config, scale_shape, weight_dtype
from .quantization.online import BIASES, CORRECTION, WEIGHTS, ExpertStreamer, LoadError, required_keys

_SHARDS = ("w1", "w2", "w3")
_LOADABLE = WEIGHTS + BIASES + (CORRECTION,)


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FusedMoE(nn.Module):
    """Routed experts: ``forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]``.

    Args:
        num_experts, top_k, hidden_size, intermediate_size: E, k, H and I (per partition).
        params_dtype: full-precision dtype (bf16/fp16/fp32): unquantized weights, biases, staging.
        quant_config: None, ``Fp8Config(scheme=...)`` or ``Int8WeightOnlyConfig()``; weights are then
            quantized online, expert by expert, as the loader receives them.
        activation: see ``fused_experts``; ``*_no_mul`` activations give ``w13_weight [E, I, H]``.
        has_bias: add ``w13_bias`` / ``w2_bias`` (loaded with the weights, zero-initialised).
        renormalize, scoring_func, num_expert_group, topk_group, routed_scaling_factor: routing (§4).
        use_correction_bias: add ``e_score_correction_bias [E]`` fp32 (DeepSeek-V3 selection bias).
        apply_router_weight_on_input: scale the GEMM1 input by the router weight (§4.5).
        shared_experts: optional module added to the output: ``shared_experts(shared_experts_input)``.
        device: target device (default: ``torch.get_default_device()``).
        activation_alpha, activation_limit: swigluoai's alpha and clamp (limit defaults to 7.0 for
            swigluoai, 0 = off otherwise; > 0 clamps silu/gelu gates as well).
        parallel: ``torch_moe_ops.ParallelConfig`` for tensor / expert parallelism over ``torch.distributed``
            (see ``docs/distributed.md``). With it, ``num_experts`` is the number of logical experts and
            ``intermediate_size`` the full (checkpoint) I; the layer holds only its local physical experts
            (``num_local_experts``) and its ``I / tp_size`` slice (``intermediate_size``).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 params_dtype: torch.dtype = torch.bfloat16, quant_config=None, activation: str = "silu",
                 has_bias: bool = False, renormalize: bool = True, scoring_func: str = "softmax",
                 num_expert_group: int = 0, topk_group: int = 0, use_correction_bias: bool = False,
                 routed_scaling_factor: float = 1.0, apply_router_weight_on_input: bool = False,
                 shared_experts: nn.Module | None = None, device=None, activation_alpha: float = 1.702,
                 activation_limit: float | None = None, parallel=None):
        super().__init__()
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
        self.quant_config = check_quant_config(quant_config)
        self.activation = canonical_activation(activation)
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.params_dtype = params_dtype
        self.has_bias, self.use_correction_bias = has_bias, use_correction_bias
        self.renormalize, self.scoring_func = renormalize, scoring_func
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.activation_alpha = float(activation_alpha)
        if activation_limit is None:
            activation_limit = 7.0 if self.activation == "swigluoai" else 0.0
        self.activation_limit = float(activation_limit)
        self.gated = is_gated(self.activation)
        self.interleaved = self.activation == "swigluoai"
        self.layer_name = ""  #: module path, set by ``load_checkpoint`` / ``finalize_loading`` for messages
        self.parallel = parallel
        self.intermediate_size_full = intermediate_size
        self.num_local_experts = num_experts
        self.num_physical_experts = num_experts
        if parallel is not None:
            self._target_device = torch.device(device) if device is not None else torch.get_default_device()

            # sets num_local_experts, num_physical_experts, intermediate_size (per TP partition) and the
            # EP / EPLB buffers (expert_map, physical_to_logical, logical_to_physical, replica_count, ...)
            if not hasattr(parallel, "setup_layer"):
                raise TypeError(f"parallel must be a torch_moe_ops.ParallelConfig, got {type(parallel).__name__}")
            parallel.setup_layer(self, quant_config)

        E, H, I = self.num_local_experts, hidden_size, self.intermediate_size
        N1 = 2 * I if self.gated else I
        dev = torch.device(device) if device is not None else torch.get_default_device()
        qc = self.quant_config
        wdtype = weight_dtype(qc, params_dtype)
        self.quant_scheme = "none" if qc is None else qc.expert_scheme
        self.block_shape = None if qc is None else qc.kernel_block_shape
        #: fp8_tensor: one scale per gate/up half of w13 (halves layout), else one for the whole w13.
        self.w13_shards = 2 if (self.gated and not self.interleaved) else 1

        def param(t):
            p = nn.Parameter(t, requires_grad=False)
            p.weight_loader = self.weight_loader
            return p

        self.w13_weight = param(torch.empty(E, N1, H, dtype=wdtype, device=dev))
        self.w2_weight = param(torch.empty(E, H, I, dtype=wdtype, device=dev))
        if qc is None:
            self.register_parameter("w13_weight_scale", None)
            self.register_parameter("w2_weight_scale", None)
            self.full_precision = {"w13_weight": self.w13_weight, "w2_weight": self.w2_weight}
        else:
            s13 = scale_shape(qc, E, N1, H, self.w13_shards)
            s2 = scale_shape(qc, E, H, I, 0)
            self.w13_weight_scale = nn.Parameter(torch.ones(s13, dtype=torch.float32, device=dev), requires_grad=False)
            self.w2_weight_scale = nn.Parameter(torch.ones(s2, dtype=torch.float32, device=dev), requires_grad=False)
            #: the model-format (checkpoint) weights: meta tensors, shape and dtype only (no memory).
            self.full_precision = {"w13_weight": torch.empty(E, N1, H, dtype=params_dtype, device="meta"),
                                   "w2_weight": torch.empty(E, H, I, dtype=params_dtype, device="meta")}
        if has_bias:
            self.w13_bias = param(torch.zeros(E, N1, dtype=params_dtype, device=dev))
            self.w2_bias = param(torch.zeros(E, H, dtype=params_dtype, device=dev))
        else:
            self.register_parameter("w13_bias", None)
            self.register_parameter("w2_bias", None)
        self.shared_experts = shared_experts
        if use_correction_bias:  # routing bias: one per logical expert, never sharded
            self.e_score_correction_bias = param(torch.zeros(num_experts, dtype=torch.float32, device=dev))
        else:
            self.register_parameter("e_score_correction_bias", None)
        self._streamer = ExpertStreamer(required_keys(E, self.gated, has_bias, use_correction_bias), self.gated)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [T, H]; router_logits: [T, E] -> [T, H] in hidden_states' dtype.

        ``shared_experts_input`` (default ``hidden_states``) feeds ``shared_experts``; its output is added."""
        self._check_ready()
        if self.parallel is not None:
            out = self.parallel.forward(self, hidden_states, *self.select_experts(router_logits))
        else:
            out = self._fused_moe(hidden_states, router_logits)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states if shared_experts_input is None else shared_experts_input)
        return out

    def _fused_moe(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return torch.ops.moe.fused_moe(
            hidden_states, router_logits, self.w13_weight, self.w2_weight, self.top_k, self.renormalize,
            self.scoring_func, self.num_expert_group, self.topk_group, self.e_score_correction_bias,
            self.routed_scaling_factor, self.activation, self.quant_scheme, self.w13_weight_scale,
            self.w2_weight_scale, self.w13_bias, self.w2_bias, self.block_shape, None,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
            activation_alpha=self.activation_alpha, activation_limit=self.activation_limit)

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits: [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)."""
        return torch.ops.moe.topk_route(
            router_logits, self.top_k, self.renormalize, self.scoring_func, self.num_expert_group, self.topk_group,
            self.e_score_correction_bias, routed_scaling_factor=self.routed_scaling_factor)

    def forward_experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """The modular form: hidden_states [T, H], topk_weights [T, k], topk_ids [T, k] -> [T, H]
        (no routing and no shared experts). With ``parallel``, ``topk_ids`` are logical ids."""
        self._check_ready()
        if self.parallel is not None:
            return self.parallel.forward(self, hidden_states, topk_weights, topk_ids)
        return torch.ops.moe.fused_experts(
            hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation,
            self.quant_scheme, self.w13_weight_scale, self.w2_weight_scale, self.w13_bias, self.w2_bias,
            self.block_shape, None, apply_router_weight_on_input=self.apply_router_weight_on_input,
            activation_alpha=self.activation_alpha, activation_limit=self.activation_limit)

    def _check_ready(self) -> None:
        if torch.compiler.is_compiling():
            return
        state = self._streamer.state
        if state == "loading" or (state == "fresh" and self.quant_config is not None):
            raise RuntimeError(f"{self._where()}: weights are not loaded ({state}); load every expert and call "
                               "torch_moe_ops.finalize_loading(model) first")

    # ---------------------------------------------------------------------------------------- state
    @property
    def load_state(self) -> str:
        """``fresh`` | ``loading`` | ``loaded`` | ``reloading`` (see ``quantization/online.py``)."""
        return self._streamer.state

    @property
    def is_loaded(self) -> bool:
        """True once ``finalize_loading`` accepted a complete set of weights."""
        return self._streamer.loaded

    @property
    def peak_staging_bytes(self) -> int:
        """High-water mark of full-precision staging held by this layer's loader (bytes)."""
        return self._streamer.peak_staging_bytes

    @property
    def staging_bytes(self) -> int:
        """Full-precision staging alive now (bytes); 0 after a complete load."""
        return self._streamer.staging_bytes

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's full-precision weights (w13 and w2 rows in ``params_dtype``)."""
        n1 = self.w13_weight.shape[1]
        return (n1 + self.intermediate_size) * self.hidden_size * self.params_dtype.itemsize

    def missing_weights(self) -> list[tuple]:
        """``(param, expert, shard)`` pieces not yet received in the current load (or reload) round."""
        return self._streamer.missing()

    def finalize_loading(self, *, strict_reload: bool = True) -> str:
        """Close the load round: ``"loaded"``, ``"reloaded"`` or ``"unchanged"``; raises ``LoadError``
        naming every missing (expert, shard). Prefer ``torch_moe_ops.finalize_loading(model)``."""
        try:
            result = self._streamer.finalize(strict_reload=strict_reload)
        except LoadError as exc:
            raise LoadError(f"{self._where()}: {exc}") from None
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        if meta:
            raise LoadError(f"{self._where()}: parameters still on the meta device after loading: {meta}")
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` of a saved (possibly quantized) ``FusedMoE`` state counts as a complete load."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        names = [n for n, p in self._parameters.items() if p is not None]
        if not error_msgs and all(prefix + n in state_dict for n in names):
            self._streamer.mark_loaded()

    def _where(self) -> str:
        return self.layer_name or f"FusedMoE(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size})"

    # ---------------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_weights(self, w13: torch.Tensor, w2: torch.Tensor, *, w13_bias: torch.Tensor | None = None,
                     w2_bias: torch.Tensor | None = None, e_score_correction_bias: torch.Tensor | None = None,
                     finalize: bool = True) -> None:
        """Load whole fused tensors (w13 [E, N1, H], w2 [E, H, I], biases [E, N1] / [E, H], correction
        bias [E]) through the streaming loader, then ``finalize_loading`` (also a reload when loaded)."""
        self.weight_loader(self.w13_weight, w13, None, None)
        self.weight_loader(self.w2_weight, w2, "w2", None)
        if w13_bias is not None:
            self.weight_loader(self.w13_bias, w13_bias, None, None)
        if w2_bias is not None:
            self.weight_loader(self.w2_bias, w2_bias, "w2", None)
        if e_score_correction_bias is not None:
            self.weight_loader(self.e_score_correction_bias, e_score_correction_bias, None, None)
        if finalize:
            self.finalize_loading()

    @torch.no_grad()
    def weight_loader(self, param, loaded_weight: torch.Tensor, shard_id: str | None = None,
                      expert_id: int | None = None, *, weight_name: str | None = None, return_success: bool = False,
                      transposed: bool | None = None):
        """Copy (and, with a quant config, quantize) one checkpoint tensor into the layer.

        Args:
            param: ``w13_weight`` | ``w2_weight`` | ``w13_bias`` | ``w2_bias`` | ``e_score_correction_bias``
                (the parameter, its meta descriptor in ``full_precision``, or its name).
            loaded_weight: float tensor on any device. Per expert: w1/w3 [I, H], w2 [H, I]; fused gate_up
                [N1, H] (``shard_id`` None or ``"w13"``, already in the layer's row order). With
                ``expert_id=None``, a leading [E] dim (all experts). Biases drop the last dim.
            shard_id: ``"w1"`` (gate; ``up_proj`` of a non-gated layer), ``"w3"`` (up), ``"w2"`` (down).
            expert_id: expert index in [0, E), or None for an all-experts tensor.
            transposed: None infers a transposed [in, out] export from a non-square shape; True/False force.

        A quantized projection is written the moment its last shard arrives. Loading a piece twice in one
        round raises; after ``finalize_loading`` a new complete set re-quantizes in place (reload).
        Returns True when ``return_success`` (every expert is local), else None.
        """
        name = self._resolve(param)
        loaded = loaded_weight
        if not isinstance(loaded, torch.Tensor):
            raise TypeError(f"{self._where()}: loaded_weight must be a tensor, got {type(loaded).__name__}")
        if not loaded.is_floating_point() or loaded.element_size() == 1:
            raise TypeError(f"{self._where()}: {name}: checkpoint tensors must be bf16/fp16/fp32 (weights are quantized "
                            f"online; pre-quantized checkpoints are not supported), got {loaded.dtype}")
        if self.w13_weight.is_meta:
            raise LoadError(f"{self._where()}: the layer was created on the meta device; pass device= the target device")
        if name == CORRECTION:
            self._load_correction(loaded)
            copied = True
        else:
            shard = self._check_shard(name, shard_id)
            if expert_id is None:
                per_expert_dim = 1 if name in BIASES else 2
                if loaded.dim() != per_expert_dim + 1 or loaded.shape[0] != self.num_experts:
                    raise ValueError(f"{self._where()}: {name} shard {shard!r} for all experts (expert_id=None) must have "
                                     f"{per_expert_dim + 1} dims with E={self.num_experts} first, got {list(loaded.shape)}")
                # an all-experts tensor is indexed by logical expert; it fills every local physical replica
                copied = False
                for e in range(self.num_experts):
                    for p in self.physical_ids(e):
                        copied |= self._load_physical(name, loaded[e], shard, p, transposed)
            else:
                if hasattr(expert_id, "__index__") and not isinstance(expert_id, bool):
                    expert_id = expert_id.__index__()  # numpy / 0-dim integer ids
                n = self.num_physical_experts
                if not isinstance(expert_id, int) or not 0 <= expert_id < n:
                    raise ValueError(f"{self._where()}: expert_id must be an int in [0, {n}), got {expert_id!r}")
                copied = self._load_physical(name, loaded, shard, expert_id, transposed)
        self._streamer.complete_round()
        return copied if return_success else None

    def physical_ids(self, logical_id: int) -> list[int]:
        """Global physical slots that hold logical expert ``logical_id`` (``[logical_id]`` without EPLB).
        Checkpoint names address logical experts: load one tensor into each of these."""
        if self.parallel is None:
            return [logical_id]
        if not isinstance(logical_id, int) or not 0 <= logical_id < self.num_experts:
            raise ValueError(f"{self._where()}: logical expert id must be an int in [0, {self.num_experts}), "
                             f"got {logical_id!r}")
        return [p for p in self.logical_to_physical[logical_id].tolist() if p >= 0]  # host-ok: loading-time lookup, not a forward path

    def _load_physical(self, name: str, t: torch.Tensor, shard: str, p: int, transposed) -> bool:
        """Load into global physical slot ``p`` if this rank holds it; False (nothing copied) otherwise."""
        if self.parallel is None:
            self._load_expert(name, t, shard, p, transposed)
            return True
        local = self._local_ids[p]
        if local < 0:
            return False
        self._load_expert(name, t, shard, local, transposed, physical=p)
        return True

    def _resolve(self, param) -> str:
        if isinstance(param, str):
            name = param
        else:
            name = next((n for n in _LOADABLE if getattr(self, n, None) is param), None)
            name = name or next((n for n, t in self.full_precision.items() if t is param), None)
            if name is None:
                raise ValueError(f"{self._where()}: param must be one of this layer's {_LOADABLE} (or its name)")
        if name not in _LOADABLE or getattr(self, name) is None:
            present = [n for n in _LOADABLE if getattr(self, n) is not None]
            raise ValueError(f"{self._where()}: cannot load {name!r}; loadable parameters are {present}")
        return name

    def _check_shard(self, name: str, shard_id) -> str:
        if shard_id is None or shard_id == "w13":
            return "w2" if name.startswith("w2") else "w13"
        if shard_id not in _SHARDS:
            raise ValueError(f"{self._where()}: shard_id must be one of {_SHARDS} (or None for a fused tensor), got {shard_id!r}")
        if name.startswith("w2") != (shard_id == "w2"):
            raise ValueError(f"{self._where()}: shard {shard_id!r} does not belong to {name} (w1 = gate and w3 = up load "
                             "into w13_*, w2 = down into w2_*)")
        if shard_id == "w3" and not self.gated:
            raise ValueError(f"{self._where()}: activation {self.activation!r} is non-gated: there is no w3 (load the "
                             "checkpoint's up_proj as w1)")
        return shard_id

    def rebalance(self, new_logical_to_physical) -> None:
        """EPLB: move experts (weights, scales, biases) so that physical slot ``p`` holds the logical expert
        ``new_logical_to_physical`` assigns to it ([E_log, max_replicas], -1 padded). Collective: every rank of
        the group calls it with the same table. Storage addresses are kept; load counters are reset."""
        if self.parallel is None:
            raise RuntimeError(f"{self._where()}: rebalance needs parallel=ParallelConfig(...)")
        self.parallel.rebalance(self, new_logical_to_physical)

    def _load_correction(self, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != (self.num_experts,):
            raise ValueError(f"{self._where()}: {CORRECTION} must have shape [{self.num_experts}], got {list(loaded.shape)}")
        self._streamer.begin([(CORRECTION, None, None)])
        self.e_score_correction_bias.copy_(loaded)

    def _expected(self, name: str, shard: str) -> tuple:
        I, H = self.intermediate_size_full, self.hidden_size
        rows = {"w1": I, "w3": I, "w13": I * (2 if self.gated else 1), "w2": H}[shard]
        if name in BIASES:
            return (rows,)
        return (rows, I if shard == "w2" else H)

    def _orient(self, t: torch.Tensor, expected: tuple, transposed, where: str) -> torch.Tensor:
        shape, rev = tuple(t.shape), expected[::-1]
        if len(expected) == 2 and transposed is True:
            if shape == rev:
                return t.transpose(0, 1)
        elif shape == expected:
            return t
        elif len(expected) == 2 and transposed is None and shape == rev:
            return t.transpose(0, 1)  # an [in, out] export, told apart by its (non-square) shape
        hint = f" (or transposed {list(rev)})" if len(expected) == 2 and transposed is not False else ""
        raise ValueError(f"{where}: expected shape {list(expected)}{hint}, got {list(shape)}")

    def _rows(self, t: torch.Tensor, shard: str) -> torch.Tensor:
        """The rows of a w13-shaped tensor ([N1, ...]) that ``shard`` fills."""
        if shard == "w13" or not self.gated:
            return t
        if self.interleaved:
            return t[0::2] if shard == "w1" else t[1::2]
        I = self.intermediate_size
        return t[:I] if shard == "w1" else t[I:]

    def _load_expert(self, name: str, t: torch.Tensor, shard: str, e: int, transposed, physical=None) -> None:
        where = f"{self._where()}: {name} expert {e if physical is None else physical} shard {shard!r}"
        t = self._orient(t, self._expected(name, shard), transposed, where)
        if self.parallel is not None and self.parallel.tp_size > 1:
            t = self.parallel.narrow(self, name, t, shard)
        if shard == "w13":
            keys = [(name, e, s) for s in (("w1", "w3") if self.gated else ("w1",))]
        else:
            keys = [(name, e, shard)]
        self._streamer.begin(keys)
        if name in BIASES:
            dst = getattr(self, name)[e]
            (dst if shard == "w2" else self._rows(dst, shard)).copy_(t)
        elif self.quant_config is None:
            dst = getattr(self, name)[e]
            (dst if shard == "w2" else self._rows(dst, shard)).copy_(t)
        elif shard in ("w2", "w13"):
            self._quantize(name, e, self._staged_copy(t))
        else:
            streamer = self._streamer
            buf = streamer.stage_w13(e, lambda: torch.empty(self.w13_weight.shape[1:], dtype=self.params_dtype,
                                                            device=self.w13_weight.device))
            self._rows(buf, shard).copy_(t)
            if streamer.mark_w13(e, shard):
                self._quantize(name, e, buf)
                streamer.release_w13(e)

    def _staged_copy(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself when it is already on the target device in ``params_dtype``; else a transient copy."""
        dev = self.w13_weight.device
        if t.device == dev and t.dtype == self.params_dtype and t.stride(-1) == 1:
            return t
        buf = torch.empty(t.shape, dtype=self.params_dtype, device=dev)
        buf.copy_(t)
        self._streamer.transient(buf.numel() * buf.element_size())
        return buf

    def _quantize(self, name: str, e: int, w: torch.Tensor) -> None:
        """Quantize one expert's full-precision projection ``w`` ([N1, H] or [H, I]) into its slot."""
        qc = self.quant_config
        if name == "w13_weight":
            qweight, scale = self.w13_weight[e], self.w13_weight_scale[e]
            shards = self.w13_shards if qc.weight_scheme == "fp8_tensor" else 1
        else:
            qweight, shards = self.w2_weight[e], 1
            scale = self.w2_weight_scale[e : e + 1] if self.w2_weight_scale.dim() == 1 else self.w2_weight_scale[e]
        quantize_weight_into(w, qweight, scale, qc.weight_scheme, block_shape=qc.kernel_block_shape, shards=shards)

    def extra_repr(self) -> str:
        parts = [f"num_experts={self.num_experts}", f"top_k={self.top_k}", f"hidden_size={self.hidden_size}",
                 f"intermediate_size={self.intermediate_size}", f"activation={self.activation!r}",
                 f"quant_scheme={self.quant_scheme!r}", f"params_dtype={self.params_dtype}"]
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
        return ", ".join(parts)


__all__ = ["FusedMoE"]
