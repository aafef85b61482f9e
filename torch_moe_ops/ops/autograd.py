"""Autograd of the expert ops (docs/training.md): ``torch.library.register_autograd`` for ``moe::fused_experts``,
``moe::fused_moe`` and ``moe::topk_route``, and the private op ``moe::_fused_experts_backward`` that computes
the expert gradients (Triton on CUDA; on CPU the reference, or the Triton launchers through the interpreter
with TORCH_MOE_OPS_BACKEND=triton).

Gradients: ``hidden_states``, ``topk_weights`` / ``router_logits``, both biases and, for full-precision
weights, ``w13`` and ``w2``. Quantized weights and their scales are frozen: asking for their gradient
raises at the op boundary (setup_context). fp8 activation quantization is differentiated as the identity
(straight-through). The backward recomputes the alignment and GEMM1 from the saved inputs, so the public ops
save no activation; the private ``moe::_fused_experts_train`` forward returns (out, c1) and its backward
reuses c1 instead (docs/training.md, "Memory and compute")."""
from __future__ import annotations

import torch

from ..reference import backward as reference_backward
from ..schemes import get_quant_scheme
from . import _checks as C
from ._registry import define, use_triton_on_cpu
from .fused_moe import EXPERTS_SCHEMA, check_expert_values, check_experts

BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
    "Tensor? c1, str activation, str quant_scheme, Tensor? w13_scale, Tensor? w2_scale, Tensor? w13_bias, "
    "Tensor? w2_bias, int[]? block_shape, Tensor? expert_map, bool apply_router_weight_on_input, "
    "float? activation_alpha, float? activation_limit, bool[] needs) -> (Tensor grad_hidden_states, "
    "Tensor grad_w13, Tensor grad_w2, Tensor grad_w13_bias, Tensor grad_w2_bias, Tensor grad_topk_weights)"
)
#: what ``needs`` (and the result) lists, in order; a gradient not needed comes back as an empty [0] tensor
GRADS = reference_backward.GRADS


def _check_backward(grad_out, x, w13, ids, c1, needs, ex, w13_bias, w2_bias) -> None:
    """The backward's own arguments (``check_experts`` covers the forward's)."""
    C.check(len(needs) == len(GRADS), f"needs must have {len(GRADS)} bools {GRADS}, got {list(needs)}")
    C.check_tensor(grad_out, "grad_out", dim=2, dtypes=(x.dtype,))
    C.check_shape(grad_out, "grad_out", tuple(x.shape), " (like hidden_states)")
    if c1 is not None:
        C.check_tensor(c1, "c1", dim=2, dtypes=(x.dtype,), contiguous=True)
        C.check_shape(c1, "c1", (x.shape[0] * ids.shape[1], w13.shape[1]), " ([T * top_k, N1], GEMM1's output)")
    n_w13, n_w2, n_b13, n_b2 = needs[1], needs[2], needs[3], needs[4]
    if ex.scheme.quantized:
        for name, need in (("w13", n_w13), ("w2", n_w2)):
            C.check(not need, f"{name} is quantized ({ex.scheme.name}); quantized weights and their scales are "
                    "frozen: no gradient for them")
    C.check(not n_b13 or w13_bias is not None, "grad of w13_bias requested but w13_bias is None")
    C.check(not n_b2 or w2_bias is not None, "grad of w2_bias requested but w2_bias is None")
    C.check_same_device(grad_out=grad_out, hidden_states=x, c1=c1)


def _empty_or(grad, like, need):
    """The op's output for one gradient: ``grad`` in ``like``'s dtype, or an empty [0] tensor when not needed."""
    if not need:
        return like.new_empty(0)
    return grad.to(like.dtype)


def _backward(grad_out, x, w13, w2, tw, ids, c1, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap,
              on_input, alpha, limit, needs, on_triton):
    ex = check_experts(x, w13, w2, tw, ids, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap, alpha,
                       limit)
    _check_backward(grad_out, x, w13, ids, c1, needs, ex, b13, b2)
    check_expert_values(w13, ids, emap)
    if on_triton:
        from .._kernels import backward as kernels

        impl = kernels.fused_experts_backward
    else:
        impl = reference_backward.fused_experts_backward
    grads = impl(grad_out, x, w13, w2, tw, ids, ex.act, ex.scheme, ex.w13_scale, ex.w2_scale, b13, b2, ex.block,
                 emap, on_input, ex.alpha, ex.limit, [bool(n) for n in needs], c1)
    likes = (x, w13, w2, b13 if b13 is not None else x, b2 if b2 is not None else x, tw)
    return tuple(_empty_or(g, like, n) for g, like, n in zip(grads, likes, needs))


@define("_fused_experts_backward", BACKWARD_SCHEMA)
def _fused_experts_backward(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, c1, activation, quant_scheme,
                            w13_scale, w2_scale, w13_bias, w2_bias, block_shape, expert_map,
                            apply_router_weight_on_input, activation_alpha, activation_limit, needs):
    return _backward(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, c1, activation, quant_scheme,
                     w13_scale, w2_scale, w13_bias, w2_bias, block_shape, expert_map, apply_router_weight_on_input,
                     activation_alpha, activation_limit, needs, on_triton=True)


@_fused_experts_backward.register_kernel("cpu")
def _fused_experts_backward_cpu(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, c1, activation,
                                quant_scheme, w13_scale, w2_scale, w13_bias, w2_bias, block_shape, expert_map,
                                apply_router_weight_on_input, activation_alpha, activation_limit, needs):
    return _backward(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, c1, activation, quant_scheme,
                     w13_scale, w2_scale, w13_bias, w2_bias, block_shape, expert_map, apply_router_weight_on_input,
                     activation_alpha, activation_limit, needs, on_triton=use_triton_on_cpu())


@_fused_experts_backward.register_fake
def _fused_experts_backward_fake(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, c1, activation,
                                 quant_scheme, w13_scale, w2_scale, w13_bias, w2_bias, block_shape, expert_map,
                                 apply_router_weight_on_input, activation_alpha, activation_limit, needs):
    ex = check_experts(hidden_states, w13, w2, topk_weights, topk_ids, activation, quant_scheme, w13_scale,
                       w2_scale, w13_bias, w2_bias, block_shape, expert_map, activation_alpha, activation_limit)
    _check_backward(grad_out, hidden_states, w13, topk_ids, c1, needs, ex, w13_bias, w2_bias)
    likes = (hidden_states, w13, w2, w13_bias if w13_bias is not None else hidden_states,
             w2_bias if w2_bias is not None else hidden_states, topk_weights)
    full = [hidden_states.shape, w13.shape, w2.shape, w13.shape[:2], w2.shape[:2], topk_weights.shape]
    return tuple(like.new_empty(shape if n else (0,), dtype=like.dtype) for like, shape, n in zip(likes, full, needs))


# ------------------------------------------------------------------------------------------ registrations
def refuse_frozen(quant_scheme, **tensors) -> None:
    """Quantized weights and their scales are frozen: a clear error when one of them requires grad."""
    scheme = get_quant_scheme(quant_scheme)
    if not scheme.quantized:
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            what = "is quantized" if name in ("w13", "w2") else "is a scale of quantized weights"
            raise ValueError(
                f"{name} {what} ({scheme.name}); quantized weights and their scales are frozen: only "
                f"hidden_states, topk_weights / router_logits and the biases get gradients (call "
                f"{name}.requires_grad_(False))")


def experts_backward(grad, x, w13, w2, tw, ids, s13, s2, b13, b2, emap, args, needs, c1=None):
    """The six expert gradients (None where not needed) through ``moe::_fused_experts_backward``.

    args: (activation, quant_scheme, block_shape, apply_router_weight_on_input, alpha, limit)."""
    if not any(needs):
        return (None,) * len(GRADS)
    activation, quant_scheme, block_shape, on_input, alpha, limit = args
    grads = torch.ops.moe._fused_experts_backward(
        grad.contiguous(), x, w13, w2, tw, ids, c1, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap,
        on_input, alpha, limit, [bool(n) for n in needs])
    return tuple(g if n else None for g, n in zip(grads, needs))


def _needs_input_grad(ctx, count: int) -> tuple:
    """``ctx.needs_input_grad`` padded to the schema's ``count`` positional inputs: the dispatcher drops
    trailing arguments equal to their defaults (None tensors then need no gradient; the extra None
    gradients returned for them are ignored by autograd)."""
    n = tuple(ctx.needs_input_grad)
    return n + (False,) * (count - len(n))


def _expert_args(activation, quant_scheme, block_shape, kw) -> tuple:
    return (activation, quant_scheme, block_shape, kw.get("apply_router_weight_on_input", False),
            kw.get("activation_alpha"), kw.get("activation_limit"))


def _experts_setup_context(ctx, inputs, keyword_only_inputs, output):
    x, w13, w2, tw, ids, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap = inputs
    refuse_frozen(quant_scheme, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2)
    ctx.save_for_backward(x, w13, w2, tw, ids, s13, s2, b13, b2, emap)
    ctx.args = _expert_args(activation, quant_scheme, block_shape, keyword_only_inputs)


def _experts_backward(ctx, grad):
    x, w13, w2, tw, ids, s13, s2, b13, b2, emap = ctx.saved_tensors
    n = _needs_input_grad(ctx, 13)
    gx, g13, g2, gb13, gb2, gtw = experts_backward(grad, x, w13, w2, tw, ids, s13, s2, b13, b2, emap, ctx.args,
                                                   (n[0], n[1], n[2], n[9], n[10], n[3]))
    return gx, g13, g2, gtw, None, None, None, None, None, gb13, gb2, None, None


def _moe_setup_context(ctx, inputs, keyword_only_inputs, output):
    (x, logits, w13, w2, top_k, renormalize, scoring_func, G, kG, bias, rsf, activation, quant_scheme, s13, s2, b13,
     b2, block_shape, emap) = inputs
    refuse_frozen(quant_scheme, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2)
    ctx.save_for_backward(x, logits, w13, w2, bias, s13, s2, b13, b2, emap)
    ctx.routing = (top_k, renormalize, scoring_func, G, kG, rsf)
    ctx.args = _expert_args(activation, quant_scheme, block_shape, keyword_only_inputs)


def _moe_backward(ctx, grad):
    x, logits, w13, w2, bias, s13, s2, b13, b2, emap = ctx.saved_tensors
    top_k, renormalize, scoring_func, G, kG, rsf = ctx.routing
    n = _needs_input_grad(ctx, 19)
    # the routing is recomputed (deterministic: the same ids as the forward), not saved
    tw, ids = torch.ops.moe.topk_route(logits, top_k, renormalize, scoring_func, G, kG, bias,
                                       routed_scaling_factor=rsf)
    gx, g13, g2, gb13, gb2, gtw = experts_backward(grad, x, w13, w2, tw, ids, s13, s2, b13, b2, emap, ctx.args,
                                                   (n[0], n[2], n[3], n[15], n[16], n[1]))
    glogits = None
    if n[1]:
        glogits = reference_backward.topk_route_backward(logits, ids, gtw, renormalize, scoring_func,
                                                         rsf).to(logits.dtype)
    return (gx, glogits, g13, g2, None, None, None, None, None, None, None, None, None, None, None, gb13, gb2,
            None, None)


def _route_setup_context(ctx, inputs, keyword_only_inputs, output):
    logits, top_k, renormalize, scoring_func, G, kG, bias = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.routing = (renormalize, scoring_func, keyword_only_inputs.get("routed_scaling_factor", 1.0))


def _route_backward(ctx, grad_weights, grad_ids):
    logits, ids = ctx.saved_tensors
    glogits = None
    if ctx.needs_input_grad[0] and grad_weights is not None:
        # The selection is piecewise constant: e_score_correction_bias gets no gradient (None = zero).
        glogits = reference_backward.topk_route_backward(logits, ids, grad_weights, *ctx.routing).to(logits.dtype)
    return glogits, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ saving forward
TRAIN_SCHEMA = EXPERTS_SCHEMA.replace(") -> Tensor", ") -> (Tensor out, Tensor c1)")


def _train(x, w13, w2, tw, ids, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap, on_input, alpha,
           limit, on_triton):
    ex = check_experts(x, w13, w2, tw, ids, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap, alpha,
                       limit)
    check_expert_values(w13, ids, emap)
    args = (x, w13, w2, tw, ids, ex.act, ex.scheme, ex.w13_scale, ex.w2_scale, b13, b2, ex.block, emap, on_input,
            ex.alpha, ex.limit)
    if on_triton:
        from .._kernels import backward as kernels

        return kernels.fused_experts_saving(*args)
    out, c1 = reference_backward.fused_experts_forward(*args)
    return out.to(x.dtype), c1.to(x.dtype)


@define("_fused_experts_train", TRAIN_SCHEMA)
def _fused_experts_train(hidden_states, w13, w2, topk_weights, topk_ids, activation="silu", quant_scheme="none",
                         w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None, expert_map=None,
                         *, apply_router_weight_on_input=False, activation_alpha=None, activation_limit=None):
    return _train(hidden_states, w13, w2, topk_weights, topk_ids, activation, quant_scheme, w13_scale, w2_scale,
                  w13_bias, w2_bias, block_shape, expert_map, apply_router_weight_on_input, activation_alpha,
                  activation_limit, on_triton=True)


@_fused_experts_train.register_kernel("cpu")
def _fused_experts_train_cpu(hidden_states, w13, w2, topk_weights, topk_ids, activation="silu", quant_scheme="none",
                             w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None,
                             expert_map=None, *, apply_router_weight_on_input=False, activation_alpha=None,
                             activation_limit=None):
    return _train(hidden_states, w13, w2, topk_weights, topk_ids, activation, quant_scheme, w13_scale, w2_scale,
                  w13_bias, w2_bias, block_shape, expert_map, apply_router_weight_on_input, activation_alpha,
                  activation_limit, on_triton=use_triton_on_cpu())


@_fused_experts_train.register_fake
def _fused_experts_train_fake(hidden_states, w13, w2, topk_weights, topk_ids, activation="silu", quant_scheme="none",
                              w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None,
                              expert_map=None, *, apply_router_weight_on_input=False, activation_alpha=None,
                              activation_limit=None):
    check_experts(hidden_states, w13, w2, topk_weights, topk_ids, activation, quant_scheme, w13_scale, w2_scale,
                  w13_bias, w2_bias, block_shape, expert_map, activation_alpha, activation_limit)
    T = hidden_states.shape[0]
    return (torch.empty_like(hidden_states, memory_format=torch.contiguous_format),
            hidden_states.new_empty((T * topk_ids.shape[1], w13.shape[1])))


def _train_setup_context(ctx, inputs, keyword_only_inputs, output):
    x, w13, w2, tw, ids, activation, quant_scheme, s13, s2, b13, b2, block_shape, emap = inputs
    refuse_frozen(quant_scheme, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2)
    # c1 (GEMM1's output, x's dtype) is the only activation this forward keeps; it gets no gradient
    ctx.save_for_backward(x, w13, w2, tw, ids, s13, s2, b13, b2, emap, output[1])
    ctx.args = _expert_args(activation, quant_scheme, block_shape, keyword_only_inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad, _grad_c1):
    x, w13, w2, tw, ids, s13, s2, b13, b2, emap, c1 = ctx.saved_tensors
    n = _needs_input_grad(ctx, 13)
    if grad is None:  # only c1 was used
        return (None,) * 13
    gx, g13, g2, gb13, gb2, gtw = experts_backward(grad, x, w13, w2, tw, ids, s13, s2, b13, b2, emap, ctx.args,
                                                   (n[0], n[1], n[2], n[9], n[10], n[3]), c1=c1)
    return gx, g13, g2, gtw, None, None, None, None, None, gb13, gb2, None, None


torch.library.register_autograd("moe::_fused_experts_train", _train_backward, setup_context=_train_setup_context)
torch.library.register_autograd("moe::fused_experts", _experts_backward, setup_context=_experts_setup_context)
torch.library.register_autograd("moe::fused_moe", _moe_backward, setup_context=_moe_setup_context)
torch.library.register_autograd("moe::topk_route", _route_backward, setup_context=_route_setup_context)
