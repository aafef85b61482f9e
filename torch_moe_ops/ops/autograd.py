"""Autograd of the expert ops (docs/training.md): ``torch.library.register_autograd`` for ``moe::fused_experts``,
``moe::fused_moe`` and ``moe::topk_route``, and the private op ``moe::_fused_experts_backward`` that computes
the expert gradients (Triton on CUDA; on CPU the reference, or the Triton launchers through the interpreter
with TORCH_MOE_OPS_BACKEND=triton).

Gradients: ``hidden_states``, ``topk_weights`` / ``router_logits``, both biases and, for full-precision
weights, ``w13`` and ``w2``. Quantized weights and their scales are frozen: asking for their gradient
raises at the op boundary (setup_context). fp8 activation quantization is differentiated as the identity
(straight-through). The backward recomputes the alignment and GEMM1 from the saved inputs, so the public ops
save no activation; the private ``moe::_fused_experts_train`` forward returns (out, c1) and its backward
reuses c1 instead (docs/training.md, "Memory and compute").

Arguments are bound by name through the ops' signatures (docs/design.md §8.3): setup_context turns its
inputs into the op's ``Args``, and each backward returns its gradients as a dict by argument name."""
from __future__ import annotations

import torch

from .. import _modes
from ..reference import backward as reference_backward
from ..schemes import get_quant_scheme
from . import _checks as C
from ._registry import use_triton_on_cpu
from .fused_moe import EXPERT_INPUTS, EXPERT_OPTIONS, FUSED_EXPERTS, FUSED_MOE, check_expert_values, check_experts
from .routing import TOPK_ROUTE
from .signature import Signature, args

#: what ``needs`` (and the result) lists, in order; a gradient not needed comes back as an empty [0] tensor
GRADS = reference_backward.GRADS
#: grad_out, the expert inputs, c1 (GEMM1's output when saved), the expert options (all positional, no
#: defaults), needs -> one gradient per name of ``GRADS``
EXPERTS_BACKWARD = Signature(
    "_fused_experts_backward",
    args("Tensor grad_out") + EXPERT_INPUTS + args("Tensor? c1") + tuple(a.required() for a in EXPERT_OPTIONS)
    + args("bool[] needs"), "(" + ", ".join(f"Tensor grad_{g}" for g in GRADS) + ")")
#: ``fused_experts``' arguments -> (out, c1)
EXPERTS_TRAIN = Signature("_fused_experts_train", FUSED_EXPERTS.args, "(Tensor out, Tensor c1)")


# ------------------------------------------------------------------------------------------ backward op
def _check_backward(a, ex) -> None:
    """The backward's own arguments (``check_experts`` covers the forward's)."""
    x = a.hidden_states
    C.check(len(a.needs) == len(GRADS), f"needs must have {len(GRADS)} bools {GRADS}, got {list(a.needs)}")
    C.check_tensor(a.grad_out, "grad_out", dim=2, dtypes=(x.dtype,))
    C.check_shape(a.grad_out, "grad_out", tuple(x.shape), " (like hidden_states)")
    if a.c1 is not None:
        C.check_tensor(a.c1, "c1", dim=2, dtypes=(x.dtype,), contiguous=True)
        C.check_shape(a.c1, "c1", (x.shape[0] * a.topk_ids.shape[1], a.w13.shape[1]),
                      " ([T * top_k, N1], GEMM1's output)")
    needs = dict(zip(GRADS, a.needs))
    if ex.scheme.quantized:
        for name in ("w13", "w2"):
            C.check(not needs[name], f"{name} is quantized ({ex.scheme.name}); quantized weights and their scales "
                    "are frozen: no gradient for them")
    C.check(not needs["w13_bias"] or a.w13_bias is not None, "grad of w13_bias requested but w13_bias is None")
    C.check(not needs["w2_bias"] or a.w2_bias is not None, "grad of w2_bias requested but w2_bias is None")
    C.check_same_device(grad_out=a.grad_out, hidden_states=x, c1=a.c1)


def _likes(a) -> list:
    """Per name of ``GRADS``: the tensor whose dtype (and device) the gradient takes (x for an absent bias)."""
    return [getattr(a, g) if getattr(a, g) is not None else a.hidden_states for g in GRADS]


def _backward(a, on_triton: bool):
    ex = check_experts(a, a.topk_weights, a.topk_ids)
    _check_backward(a, ex)
    check_expert_values(a.w13, a.topk_ids, a.expert_map)
    if on_triton:
        from .._kernels import backward as kernels

        impl = kernels.fused_experts_backward
    else:
        impl = reference_backward.fused_experts_backward
    grads = impl(a.grad_out, *ex.kernel_args(a, a.topk_weights, a.topk_ids), [bool(n) for n in a.needs], a.c1)
    # a gradient not needed: an empty [0] tensor; else the gradient in its argument's dtype
    return tuple(g.to(like.dtype) if n else like.new_empty(0) for g, like, n in zip(grads, _likes(a), a.needs))


def _backward_fake(a):
    ex = check_experts(a, a.topk_weights, a.topk_ids)
    _check_backward(a, ex)
    full = dict(hidden_states=a.hidden_states.shape, w13=a.w13.shape, w2=a.w2.shape, w13_bias=a.w13.shape[:2],
                w2_bias=a.w2.shape[:2], topk_weights=a.topk_weights.shape)
    return tuple(like.new_empty(full[g] if n else (0,), dtype=like.dtype)
                 for g, like, n in zip(GRADS, _likes(a), a.needs))


_fused_experts_backward = EXPERTS_BACKWARD.define(cuda=lambda a: _backward(a, True),
                                                  cpu=lambda a: _backward(a, use_triton_on_cpu()), fake=_backward_fake)


# ------------------------------------------------------------------------------------------ saving forward
def _train(a, on_triton: bool):
    ex = check_experts(a, a.topk_weights, a.topk_ids)
    check_expert_values(a.w13, a.topk_ids, a.expert_map)
    kernel_args = ex.kernel_args(a, a.topk_weights, a.topk_ids)
    if on_triton:
        from .._kernels import fused_experts as kernels

        return kernels.fused_experts(*kernel_args, keep_c1=True, invariant=ex.invariant)
    out, c1 = reference_backward.fused_experts_forward(*kernel_args, invariant=ex.invariant)
    return out.to(a.hidden_states.dtype), c1.to(a.hidden_states.dtype)


def _train_fake(a):
    check_experts(a, a.topk_weights, a.topk_ids)
    x = a.hidden_states
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[0] * a.topk_ids.shape[1], a.w13.shape[1])))


_fused_experts_train = EXPERTS_TRAIN.define(cuda=lambda a: _train(a, True),
                                            cpu=lambda a: _train(a, use_triton_on_cpu()), fake=_train_fake)
_TRAIN_DOC = """The saving forward (docs/training.md): ``fused_experts`` that also returns GEMM1's output.

    Returns:
        out: [T, H] as ``fused_experts``; c1: [T * top_k, N1] in hidden_states' dtype, which the backward reuses
        instead of recomputing GEMM1 (no gradient flows into it). ``help(fused_experts)`` documents the arguments.
    """
#: ``fused_experts_train(hidden_states, w13, w2, topk_weights, topk_ids, *, activation="silu", ...) -> (out, c1)``
fused_experts_train = EXPERTS_TRAIN.wrapper(5, _TRAIN_DOC, __name__, resolve={"batch_invariant": _modes.resolve})


# ------------------------------------------------------------------------------------------ registrations
def refuse_frozen(a) -> None:
    """Quantized weights and their scales are frozen: a clear error when one of them requires grad."""
    scheme = get_quant_scheme(a.quant_scheme)
    if not scheme.quantized:
        return
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        t = getattr(a, name)
        if t is not None and t.requires_grad:
            what = "is quantized" if name in ("w13", "w2") else "is a scale of quantized weights"
            raise ValueError(
                f"{name} {what} ({scheme.name}); quantized weights and their scales are frozen: only "
                f"hidden_states, topk_weights / router_logits and the biases get gradients (call "
                f"{name}.requires_grad_(False))")


def experts_backward(grad, a, topk_weights, topk_ids, needs: dict, c1=None) -> dict:
    """The expert gradients by name of ``GRADS`` (None where ``needs[name]`` is false) through
    ``moe::_fused_experts_backward``; ``a``: the forward's ``Args`` (any op with the expert arguments)."""
    need = [bool(needs[g]) for g in GRADS]
    if not any(need):
        return dict.fromkeys(GRADS)
    grads = EXPERTS_BACKWARD.call(a, grad_out=grad.contiguous(), topk_weights=topk_weights, topk_ids=topk_ids,
                                  c1=c1, needs=need)
    return {g: t if n else None for g, t, n in zip(GRADS, grads, need)}


def _experts_setup_context(ctx, inputs, keyword_only_inputs, output):
    a = FUSED_EXPERTS.bind(inputs, keyword_only_inputs)
    refuse_frozen(a)
    FUSED_EXPERTS.save(ctx, a)


def _experts_backward(ctx, grad):
    a, _ = FUSED_EXPERTS.saved(ctx)
    needs = FUSED_EXPERTS.needs_input_grad(ctx)
    return FUSED_EXPERTS.grads(experts_backward(grad, a, a.topk_weights, a.topk_ids, needs))


def _moe_setup_context(ctx, inputs, keyword_only_inputs, output):
    a = FUSED_MOE.bind(inputs, keyword_only_inputs)
    refuse_frozen(a)
    FUSED_MOE.save(ctx, a)


def _moe_backward(ctx, grad):
    a, _ = FUSED_MOE.saved(ctx)
    needs = FUSED_MOE.needs_input_grad(ctx)
    # the routing is recomputed (deterministic: the same ids as the forward), not saved
    tw, ids = TOPK_ROUTE.call(a)
    grads = experts_backward(grad, a, tw, ids, dict(needs, topk_weights=needs["router_logits"]))
    gtw = grads.pop("topk_weights")
    if needs["router_logits"]:
        grads["router_logits"] = reference_backward.topk_route_backward(
            a.router_logits, ids, gtw, a.renormalize, a.scoring_func, a.routed_scaling_factor).to(a.router_logits.dtype)
    return FUSED_MOE.grads(grads)


def _route_setup_context(ctx, inputs, keyword_only_inputs, output):
    a = TOPK_ROUTE.bind(inputs, keyword_only_inputs)
    ctx.save_for_backward(a.router_logits, output[1])
    ctx.routing = (a.renormalize, a.scoring_func, a.routed_scaling_factor)


def _route_backward(ctx, grad_weights, grad_ids):
    logits, ids = ctx.saved_tensors
    grads = {}
    if TOPK_ROUTE.needs_input_grad(ctx)["router_logits"] and grad_weights is not None:
        # The selection is piecewise constant: e_score_correction_bias gets no gradient (None = zero).
        grads["router_logits"] = reference_backward.topk_route_backward(logits, ids, grad_weights,
                                                                        *ctx.routing).to(logits.dtype)
    return TOPK_ROUTE.grads(grads)


def _train_setup_context(ctx, inputs, keyword_only_inputs, output):
    a = EXPERTS_TRAIN.bind(inputs, keyword_only_inputs)
    refuse_frozen(a)
    # c1 (GEMM1's output, x's dtype) is the only activation this forward keeps; it gets no gradient
    EXPERTS_TRAIN.save(ctx, a, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad, _grad_c1):
    a, (c1,) = EXPERTS_TRAIN.saved(ctx)
    if grad is None:  # only c1 was used
        return EXPERTS_TRAIN.grads({})
    needs = EXPERTS_TRAIN.needs_input_grad(ctx)
    return EXPERTS_TRAIN.grads(experts_backward(grad, a, a.topk_weights, a.topk_ids, needs, c1=c1))


torch.library.register_autograd("moe::_fused_experts_train", _train_backward, setup_context=_train_setup_context)
torch.library.register_autograd("moe::fused_experts", _experts_backward, setup_context=_experts_setup_context)
torch.library.register_autograd("moe::fused_moe", _moe_backward, setup_context=_moe_setup_context)
torch.library.register_autograd("moe::topk_route", _route_backward, setup_context=_route_setup_context)
