"""``moe::fused_experts`` (docs/design.md §8) and ``moe::fused_moe`` (routing + fused experts in one op).

Each op's signature is written once (``FUSED_EXPERTS``, ``FUSED_MOE``; docs/design.md §8.3): the schema, the
kernels, the fake and the public functions derive from it, and every implementation receives one ``Args``
namedtuple (``a.w13``). The scheme and activation names are resolved here into registry objects; the kernels
and the reference receive the objects, canonical scales and the resolved ``alpha`` / ``limit``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import _modes, _platform, reference
from .._kernels.plan import PlanCache, run_planned
from ..schemes import ACTIVATIONS, QUANT_SCHEMES, Activation, QuantScheme, get_activation, get_quant_scheme
from . import _checks as C
from ._registry import use_triton_on_cpu
from .decompose import decompose
from .routing import ROUTING_OPTIONS, check_bias_values, check_routing, route
from .signature import Signature, args

#: The expert inputs of ``fused_experts`` (``fused_moe`` routes instead of taking topk_weights / topk_ids).
EXPERT_INPUTS = args("Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids")
#: The options both ops (and the private training / backward ops) share, in schema order.
EXPERT_OPTIONS = args(
    'str activation="silu", str quant_scheme="none", Tensor? w13_scale=None, Tensor? w2_scale=None, '
    "Tensor? w13_bias=None, Tensor? w2_bias=None, int[]? block_shape=None, Tensor? expert_map=None, *, "
    "bool apply_router_weight_on_input=False, float? activation_alpha=None, float? activation_limit=None, "
    "bool batch_invariant=False")
FUSED_EXPERTS = Signature("fused_experts", EXPERT_INPUTS + EXPERT_OPTIONS, "Tensor")
FUSED_MOE = Signature("fused_moe", args("Tensor hidden_states, Tensor router_logits, Tensor w13, Tensor w2, int top_k")
                      + ROUTING_OPTIONS + args("float routed_scaling_factor=1.0") + EXPERT_OPTIONS, "Tensor")
EXPERTS_SCHEMA, MOE_SCHEMA = FUSED_EXPERTS.schema, FUSED_MOE.schema


def _check_scale(scale, name, scheme: QuantScheme, shapes, what):
    """``shapes``: the accepted shapes for ``scale`` (first canonical); returns the kernels' view of it."""
    C.check(scale is not None, f"quant_scheme={scheme.name!r} needs {name} ({what})")
    C.check_tensor(scale, name, dtypes=(scheme.weight.scale_dtype,), contiguous=True)
    for shape in shapes:
        if scale.dim() == len(shape) and all(a == b for a, b in zip(scale.shape, shape)):
            return scheme.canonical_scale(scale)
    accepted = " or ".join(str(list(s)) for s in shapes)
    raise ValueError(f"{name} must have shape {accepted} for quant_scheme={scheme.name!r}, got {list(scale.shape)}")


def _check_weight_dtypes(x, w13, w2, scheme: QuantScheme) -> None:
    """Weight dtypes against the scheme and ``hidden_states``; the message blames the argument most likely wrong
    (the activations when both weights agree, ``quant_scheme`` for quantized storage with the default scheme)."""
    for name, w in (("w13", w13), ("w2", w2)):
        C.check_tensor(w, name)
    wanted = scheme.weight_dtypes(x.dtype)
    if w13.dtype in wanted and w2.dtype in wanted:
        return
    if not scheme.quantized:
        stored = [s.name for s in QUANT_SCHEMES.values() if s.quantized and s.weight.qdtype in (w13.dtype, w2.dtype)]
        if stored:
            raise TypeError(f"w13/w2 have dtype {w13.dtype}/{w2.dtype} (quantized storage) but quant_scheme='none': "
                            f"pass quant_scheme= one of {stored} with w13_scale and w2_scale")
        if w13.dtype == w2.dtype and w13.dtype in C.FLOAT_DTYPES:
            raise TypeError(f"hidden_states has dtype {x.dtype} but the unquantized weights w13/w2 are {w13.dtype}: "
                            f"unquantized experts compute in the weights' dtype; cast hidden_states "
                            f"(hidden_states.to({w13.dtype}))")
    name, w = ("w13", w13) if w13.dtype not in wanted else ("w2", w2)
    want = ", ".join(str(d).replace("torch.", "") for d in wanted)
    fix = (f"; quantize it first: torch_moe_ops.quantize_weight({name}, {scheme.name!r})" if scheme.quantized
           and w.dtype in C.FLOAT_DTYPES else "")
    raise TypeError(f"{name} must have dtype {want} for quant_scheme={scheme.name!r} (hidden_states {x.dtype}), "
                    f"got {w.dtype}{fix}")


#: Launch plans of the CUDA calls (docs/host-overhead.md): signature -> recorded launches.
PLANS = PlanCache()


def clear_launch_plans() -> None:
    """Forget every recorded launch plan: the next call of each signature records again. Needed only after
    changing what the recording read once: the tuned tile tables (``TORCH_MOE_OPS_TUNED_DIR``, a new JSON)."""
    PLANS.clear()


def plans_on() -> bool:
    """CUDA calls replay launch plans unless debug mode (value checks, NaN poisoning) is on."""
    return not _platform.debug_checks() and _platform.launch_plans()


def _sig(t):
    """What a plan depends on of a tensor argument: geometry, dtype, and the 16-byte alignment Triton
    specializes on (the values never matter: no host sync)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


class Experts:
    """Checked, canonical ``fused_experts`` arguments: registry objects, kernel-view scales, floats."""

    __slots__ = ("act", "scheme", "w13_scale", "w2_scale", "block", "alpha", "limit", "invariant")

    def __init__(self, act, scheme, w13_scale, w2_scale, block, alpha, limit, invariant):
        self.act: Activation = act
        self.scheme: QuantScheme = scheme
        self.w13_scale, self.w2_scale, self.block = w13_scale, w2_scale, block
        self.alpha, self.limit = alpha, limit
        self.invariant: bool = invariant  #: batch-invariant mode (docs/batch-invariance.md)

    def kernel_args(self, a, topk_weights, topk_ids) -> tuple:
        """The positional arguments of the kernels' and the reference's ``fused_experts`` (and of their
        saving and backward forms, which append their own)."""
        return (a.hidden_states, a.w13, a.w2, topk_weights, topk_ids, self.act, self.scheme, self.w13_scale,
                self.w2_scale, a.w13_bias, a.w2_bias, self.block, a.expert_map, a.apply_router_weight_on_input,
                self.alpha, self.limit)


def check_experts(a, topk_weights, topk_ids) -> Experts:
    """Validate the expert arguments of ``a`` (any op's ``Args`` with the ``EXPERT_OPTIONS``, hidden_states,
    w13 and w2) with ``topk_weights`` [T, k] / ``topk_ids`` [T, k] (None: fused_moe, whose routing makes
    them). Shapes, dtypes, strides only: also on FakeTensors."""
    x, w13, w2, w13_scale, w2_scale = a.hidden_states, a.w13, a.w2, a.w13_scale, a.w2_scale
    w13_bias, w2_bias, expert_map = a.w13_bias, a.w2_bias, a.expert_map
    act = get_activation(a.activation)
    scheme = get_quant_scheme(a.quant_scheme)
    C.check_tensor(x, "hidden_states", dim=2, dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    _check_weight_dtypes(x, w13, w2, scheme)
    C.check_tensor(w13, "w13", dim=3, last_contiguous=True)
    C.check_tensor(w2, "w2", dim=3, last_contiguous=True)
    pack = scheme.weight.pack if scheme.quantized else 1
    T, H = x.shape
    E, N1 = w13.shape[0], w13.shape[1]
    I = w2.shape[2] * pack
    packed = f" ({pack} values per byte along the last dim)" if pack > 1 else ""
    C.check(w13.shape[2] * pack == H, f"w13 must be [E, N1, H={H}]{packed} (H from hidden_states), got {list(w13.shape)}")
    C.check(w2.shape[0] == E and w2.shape[1] == H, f"w2 must be [E={E}, H={H}, I]{packed}, got {list(w2.shape)}")
    want = act.n1(I)
    C.check(N1 == want, f"w13 has {N1} rows but activation {act.name!r} with w2's I={I} needs {want} "
            f"({'[E, 2I, H] gated' if act.gated else '[E, I, H] non-gated'})")
    if topk_ids is not None:  # None: fused_moe, whose routing makes them
        C.check_tensor(topk_weights, "topk_weights", dim=2, dtypes=C.FLOAT_DTYPES, contiguous=True)
        C.check_tensor(topk_ids, "topk_ids", dim=2, dtypes=C.INDEX_DTYPES, contiguous=True)
        C.check_shape(topk_ids, "topk_ids", (T, topk_weights.shape[1]), " (like topk_weights, T from hidden_states)")
        C.check_shape(topk_weights, "topk_weights", (T, topk_ids.shape[1]), " (T from hidden_states)")
        C.check_pairs(T, topk_ids.shape[1])
    alpha, limit = act.alpha(a.activation_alpha), act.limit(a.activation_limit)
    C.check(limit >= 0, f"activation_limit must be >= 0 (0 disables clamping), got {limit}")
    block = scheme.block_shape(a.block_shape)
    if not scheme.quantized:
        C.check(w13_scale is None and w2_scale is None, "w13_scale/w2_scale given but quant_scheme='none' would ignore them")
    else:
        if scheme.weight.pack > 1:
            for name, K in (("hidden_states' H", H), ("w2's I", I)):
                C.check(K % block[1] == 0, f"quant_scheme={scheme.name!r}: {name} = {K} must be divisible by the "
                        f"group size {block[1]} (block_shape={list(block)})")
        w13_scale = _check_scale(w13_scale, "w13_scale", scheme,
                                 scheme.weight_scale_shapes(E, N1, H, block, gate_up=act.gated), "weight scales")
        w2_scale = _check_scale(w2_scale, "w2_scale", scheme,
                                scheme.weight_scale_shapes(E, H, I, block, gate_up=False), "weight scales")
    if w13_bias is not None:
        C.check_tensor(w13_bias, "w13_bias", dim=2, dtypes=C.FLOAT_DTYPES, contiguous=True)
        C.check_shape(w13_bias, "w13_bias", (E, N1))
    if w2_bias is not None:
        C.check_tensor(w2_bias, "w2_bias", dim=2, dtypes=C.FLOAT_DTYPES, contiguous=True)
        C.check_shape(w2_bias, "w2_bias", (E, H))
    if expert_map is not None:
        C.check_tensor(expert_map, "expert_map", dim=1, dtypes=(torch.int32,), contiguous=True)
    C.check_same_device(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                        w13_scale=w13_scale, w2_scale=w2_scale, w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map)
    C.check(isinstance(a.batch_invariant, bool), f"batch_invariant must be a bool, got {a.batch_invariant!r}")
    return Experts(act, scheme, w13_scale, w2_scale, block, alpha, limit, a.batch_invariant)


def check_expert_values(w13, topk_ids, expert_map):
    """Ids in range (CPU always, CUDA in debug mode); a bad id never reaches a kernel as an address."""
    num_global = expert_map.numel() if expert_map is not None else w13.shape[0]
    C.check_ids_in_range(topk_ids, "topk_ids", 0, num_global)
    if expert_map is not None:
        C.check_ids_in_range(expert_map, "expert_map", -1, w13.shape[0])


def run_experts(a, topk_weights, topk_ids, ex: Experts, on_triton: bool):
    """Checked, canonical arguments -> the Triton pipeline or the reference."""
    if on_triton:
        from .._kernels import fused_experts as kernels

        impl = kernels.fused_experts
    else:
        impl = reference.fused_experts
    return impl(*ex.kernel_args(a, topk_weights, topk_ids), invariant=ex.invariant)


def planned(sig: Signature, body):
    """The CUDA kernel of ``sig``'s op: ``body(a, on_triton=True)`` through the launch plan of the call's
    key (docs/host-overhead.md); key and inputs come from the signature (``Signature.plan_key``)."""
    plan_key = sig.plan_key(_sig, getattr(torch._C, "_cuda_getDevice", None))

    def cuda(a):
        def run():
            return body(a, True)

        index = a[0].device.index  # Triton launches on the current device: make it the tensors'
        if index is not None and index != torch._C._cuda_getDevice():
            with torch.cuda.device(index):
                return cuda(a)
        if not plans_on():
            return run()
        key, inputs = plan_key(a)
        return run_planned(PLANS, key, inputs, run)

    return cuda


def _fake_output(a):
    return torch.empty_like(a.hidden_states, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------ fused_experts
def experts(a, on_triton: bool):
    ex = check_experts(a, a.topk_weights, a.topk_ids)
    check_expert_values(a.w13, a.topk_ids, a.expert_map)
    return run_experts(a, a.topk_weights, a.topk_ids, ex, on_triton)


def _experts_fake(a):
    check_experts(a, a.topk_weights, a.topk_ids)
    return _fake_output(a)


_experts_cuda = planned(FUSED_EXPERTS, experts)
_fused_experts = FUSED_EXPERTS.define(cuda=_experts_cuda,
                                      cpu=lambda a: experts(a, use_triton_on_cpu()), fake=_experts_fake)
decompose(_fused_experts, FUSED_EXPERTS, experts, FUSED_EXPERTS.define_inference(cuda=_experts_cuda, fake=_experts_fake))


# ------------------------------------------------------------------------------------------ fused_moe
def check_moe(a):
    x, router_logits, w13, expert_map = a.hidden_states, a.router_logits, a.w13, a.expert_map
    check_routing(router_logits, a.top_k, a.scoring_func, a.num_expert_group, a.topk_group, a.e_score_correction_bias)
    C.check_pairs(x.shape[0], a.top_k)
    C.check(router_logits.dim() == 2 and router_logits.shape[0] == x.shape[0],
            f"router_logits must be [T={x.shape[0]}, E] (T from hidden_states), got {list(router_logits.shape)}")
    n_logical = expert_map.shape[0] if expert_map is not None else w13.shape[0]
    C.check(router_logits.shape[1] == n_logical,
            f"router_logits has {router_logits.shape[1]} experts but "
            + (f"expert_map has {n_logical}" if expert_map is not None else f"w13 has E={n_logical}"))


def moe(a, on_triton: bool):
    check_moe(a)
    # The expert arguments are checked once, before the routing kernel runs; routing's outputs are
    # [T, k] fp32 / int32 ids in [0, E_logical) by construction, so they need no second check.
    ex = check_experts(a, None, None)
    if a.expert_map is not None:
        C.check_ids_in_range(a.expert_map, "expert_map", -1, a.w13.shape[0])
    routing = (a.top_k, a.renormalize, a.scoring_func, a.num_expert_group, a.topk_group, a.e_score_correction_bias,
               a.routed_scaling_factor)
    if on_triton:  # routing and experts together: at T = 1 the routing kernel also aligns
        from .._kernels import fused_experts as kernels

        check_bias_values(a.e_score_correction_bias)
        x, w13, w2, _, _, *options = ex.kernel_args(a, None, None)
        return kernels.fused_moe(x, a.router_logits, routing, (w13, w2, *options), invariant=ex.invariant)
    weights, ids = route(a.router_logits, *routing, on_triton=False)
    return run_experts(a, weights, ids, ex, on_triton)


def _moe_fake(a):
    check_moe(a)
    check_experts(a, None, None)
    return _fake_output(a)


_moe_cuda = planned(FUSED_MOE, moe)
_fused_moe = FUSED_MOE.define(cuda=_moe_cuda, cpu=lambda a: moe(a, use_triton_on_cpu()), fake=_moe_fake)
decompose(_fused_moe, FUSED_MOE, moe, FUSED_MOE.define_inference(cuda=_moe_cuda, fake=_moe_fake))


# ------------------------------------------------------------------------------------------ public functions
_EXPERTS_DOC = f"""
        activation: default silu; swigluoai takes an interleaved w13, a ``*_no_mul`` form w13 [E, I, H]. One of
            {", ".join(ACTIVATIONS)} (``torch_moe_ops.schemes.ACTIVATIONS``).
        quant_scheme: ``none`` (w13/w2 in x's dtype), ``fp8_tensor``, ``fp8_channel``, ``fp8_block`` (fp8
            e4m3fn weights; activations quantized per token, or per 1 x block_k group for fp8_block, inside
            the op), ``int8_w8a16`` (int8 weights), ``int4_w4a16`` (uint8 w13 [E, N1, H/2], w2 [E, H, I/2]:
            two int4 per byte along K; activations stay in x's dtype). See docs/design.md §3.
        w13_scale, w2_scale: fp32. fp8_tensor: w13 [E, 2] (gate, up; or [E]), w2 [E]. fp8_channel and
            int8_w8a16: [E, N1] and [E, H]. fp8_block: [E, ceil(N1/bn), ceil(H/bk)] and
            [E, ceil(H/bn), ceil(I/bk)]. int4_w4a16: [E, N1, H/G] and [E, H, I/G].
        w13_bias: [E, N1]; w2_bias: [E, H] (added after dequantization; the w2 bias is router-weighted).
        block_shape: the scale tile: [bn, bk] for fp8_block (default [128, 128]), [1, G] for int4_w4a16
            (G in {32, 64, 128}, default [1, 128]; H and I divisible by G).
        expert_map: [E_global] int32 global -> local id (-1: another rank's expert, contributes zero).
        apply_router_weight_on_input: scale the GEMM1 input by the router weight instead of the output.
        activation_alpha, activation_limit: swigluoai's alpha and clamp limit; None takes the
            activation's default (alpha 1.702; limit 7.0 for swigluoai, 0 = off for the others); a limit
            > 0 also clamps silu/gelu gated activations (clamped swiglu).
        batch_invariant: each token's output row bitwise independent of the rest of the batch and of T
            (docs/batch-invariance.md). None (the default of these functions) follows
            ``torch_moe_ops.batch_invariant()``; ``torch.ops.moe.*`` take a bool (default False).

    Returns:
        [T, H] in hidden_states' dtype (a fresh tensor).
"""

_FUSED_EXPERTS_DOC = """Run the routed experts: ``out[t] = sum_j w_j * (f(x_t @ W13[e_j]^T + b13) @ W2[e_j]^T + b2)``.

    Args:
        hidden_states: [T, H] bf16/fp16/fp32, last dim contiguous.
        w13: [E, 2I, H] gate rows then up rows (or [E, I, H] non-gated); w2: [E, H, I]. Last dim contiguous.
        topk_weights: [T, k] fp32 router weights; topk_ids: [T, k] int32/int64 expert ids (global ids
            when ``expert_map`` is given).""" + _EXPERTS_DOC

_FUSED_MOE_DOC = """Route and run the experts in one op (``topk_route`` then ``fused_experts``).

    Args:
        hidden_states: [T, H]; router_logits: [T, E_logical] (E_logical = len(expert_map) or E).
        w13, w2: as in ``fused_experts``. top_k and the routing keywords: as in ``topk_route``.""" + _EXPERTS_DOC

# The public functions are generated (``Signature.wrapper``; on plain CUDA tensors without autograd they call the
# CUDA kernel directly, docs/host-overhead.md): static type checkers and IDEs cannot see their
# parameters, so for them the same parameters are written out as plain stubs, pinned to the generated
# functions by tests/ops/test_static_signatures.py. At runtime only the ``else`` branch runs.
if TYPE_CHECKING:
    def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, *, activation: str = "silu", quant_scheme: str = "none",
                      w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                      w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                      block_shape: list[int] | None = None, expert_map: torch.Tensor | None = None,
                      apply_router_weight_on_input: bool = False, activation_alpha: float | None = None,
                      activation_limit: float | None = None, batch_invariant: bool | None = None) -> torch.Tensor:
        """Run the routed experts (``topk_weights`` / ``topk_ids`` from ``topk_route``). ``help(fused_experts)``
        documents the arguments."""
        ...

    def fused_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  top_k: int, *, renormalize: bool = True, scoring_func: str = "softmax", num_expert_group: int = 0,
                  topk_group: int = 0, e_score_correction_bias: torch.Tensor | None = None,
                  routed_scaling_factor: float = 1.0, activation: str = "silu", quant_scheme: str = "none",
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                  block_shape: list[int] | None = None, expert_map: torch.Tensor | None = None,
                  apply_router_weight_on_input: bool = False, activation_alpha: float | None = None,
                  activation_limit: float | None = None, batch_invariant: bool | None = None) -> torch.Tensor:
        """Route and run the experts in one op (``topk_route`` then ``fused_experts``). ``help(fused_moe)``
        documents the arguments."""
        ...
else:
    #: ``fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, *, activation="silu", ...)``
    fused_experts = FUSED_EXPERTS.wrapper(5, _FUSED_EXPERTS_DOC, __name__, cuda=_experts_cuda,
                                          resolve={"batch_invariant": _modes.resolve})
    #: ``fused_moe(hidden_states, router_logits, w13, w2, top_k, *, renormalize=True, ...)``
    fused_moe = FUSED_MOE.wrapper(5, _FUSED_MOE_DOC, __name__, cuda=_moe_cuda,
                                  resolve={"batch_invariant": _modes.resolve})
