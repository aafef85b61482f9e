"""Reference backward of the MoE ops (docs/training.md): pure PyTorch, one expert at a time, fp32 math
(fp64 when the inputs are fp64, so the functions can be ``gradcheck``-ed). They back the CPU kernels of
``moe::_fused_experts_backward`` and are the spec of the Triton backward (``_kernels/backward.py``).

Per pair ``j = (t, slot)`` of local expert e, with router weight ``w_j`` (docs/design.md §8)::

    a_j = x_t (or x_t·w_j on input)   c1_j = q(a_j) @ W13[e]ᵀ + b13[e]   h_j = q(f(c1_j))
    y_j = h_j @ W2[e]ᵀ + b2[e]        out_t = Σ_j w_j·y_j (or Σ_j y_j on input)

``q`` is the scheme's dynamic activation quantization (fp8 schemes); its derivative is taken as the
identity (straight-through estimator). Quantized weights are dequantized per expert, so no
full-precision copy of the weight stack exists; they are frozen (no weight gradients).
"""
from __future__ import annotations

import torch

from ..schemes import FLT_MAX, Activation, QuantScheme
from .align import local_expert_ids
from .fused_experts import _expert_weight
from .invariant import rows_times, rowwise
from .quant import fake_quantize_activation
from .routing import score

#: The gradients ``fused_experts_backward`` can compute, in the order of its ``needs`` and its result.
GRADS = ("hidden_states", "w13", "w2", "w13_bias", "w2_bias", "topk_weights")


def acc_dtype(*tensors) -> torch.dtype:
    """fp64 if any (floating) input is fp64, else fp32: the references never compute below fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------- experts
class _Experts:
    """The per-expert view shared by the reference forward and backward (dequantized weights, pairs)."""

    def __init__(self, x, w13, w2, topk_weights, topk_ids, act, scheme, w13_scale, w2_scale, block, expert_map,
                 acc):
        self.w13, self.w2, self.s13, self.s2, self.block, self.acc = w13, w2, w13_scale, w2_scale, block, acc
        self.fmt, self.aq, self.group = scheme.weight, scheme.act, scheme.act_group(block)
        # interleaved w13 with per-tensor gate/up scales: the row parity picks the scale
        self.halves = (self.fmt is not None and self.fmt.sharded and act.interleaved
                       and w13_scale.numel() == 2 * w13.shape[0])
        T, k = topk_ids.shape
        num_global = w13.shape[0] if expert_map is None else expert_map.numel()
        self.local = local_expert_ids(topk_ids, num_global, expert_map).view(T, k)
        self.x, self.topk_weights, self.k = x, topk_weights, k

    def experts(self):
        """(e, tok, slot, router weight [n, 1]) for every local expert with pairs (a host loop: CPU only)."""
        for e in self.local.unique().tolist():
            if e < 0:
                continue
            tok, slot = (self.local == e).nonzero(as_tuple=True)
            yield e, tok, slot, self.topk_weights[tok, slot].to(self.acc)[:, None]

    def weights(self, e):
        """Expert e's (W13 [N1, H], W2 [H, I]) dequantized, in the compute dtype (one expert at a time)."""
        if self.fmt is None:
            return self.w13[e].to(self.acc), self.w2[e].to(self.acc)
        return (_expert_weight(self.w13, self.s13, e, self.fmt, self.block, self.halves).to(self.acc),
                _expert_weight(self.w2, self.s2, e, self.fmt, self.block).to(self.acc))

    def q(self, a):
        """The GEMM's view of an activation: fake-quantized for fp8 schemes (straight-through in backward)."""
        return a if self.aq is None else fake_quantize_activation(a, self.aq, self.group).to(self.acc)


def fused_experts_forward(x, w13, w2, topk_weights, topk_ids, act: Activation, scheme: QuantScheme, w13_scale,
                          w2_scale, w13_bias, w2_bias, block, expert_map, on_input: bool, alpha: float, limit: float,
                          *, invariant: bool = False):
    """The forward with its GEMM1 output: (out [T, H], c1 [T·k, N1]) in the compute dtype (fp32, or fp64 for
    fp64 inputs). Rows of c1 for pairs of non-local experts are 0. Same math as ``reference.fused_experts``
    (``invariant``: its batch-invariant products)."""
    acc = acc_dtype(x, topk_weights)
    ex = _Experts(x, w13, w2, topk_weights, topk_ids, act, scheme, w13_scale, w2_scale, block, expert_map, acc)
    T, H = x.shape
    out = torch.zeros(T, H, dtype=acc, device=x.device)
    c1 = torch.zeros(T * ex.k, w13.shape[1], dtype=acc, device=x.device)
    for e, tok, slot, rw in ex.experts():
        W13, W2 = ex.weights(e)
        a = x[tok].to(acc) * rw if on_input else x[tok].to(acc)
        h1 = rows_times(ex.q(a), W13, invariant)
        if w13_bias is not None:
            h1 = h1 + w13_bias[e].to(acc)
        c1[tok * ex.k + slot] = h1
        y = rows_times(ex.q(rowwise(lambda t: act.apply(t, alpha, limit), h1, invariant)), W2, invariant)
        if w2_bias is not None:
            y = y + w2_bias[e].to(acc)
        out.index_add_(0, tok, y if on_input else y * rw)
    return out, c1


def fused_experts_backward(grad_out, x, w13, w2, topk_weights, topk_ids, act: Activation, scheme: QuantScheme,
                           w13_scale, w2_scale, w13_bias, w2_bias, block, expert_map, on_input: bool, alpha: float,
                           limit: float, needs, c1=None):
    """Gradients of ``fused_experts`` for ``grad_out`` [T, H].

    needs: six bools in ``GRADS`` order (hidden_states, w13, w2, w13_bias, w2_bias, topk_weights). c1: the
    forward's GEMM1 output [T·k, N1] (any float dtype) or None to recompute it. Returns six tensors (None
    where not needed) in the compute dtype: dx [T, H], dW13 [E, N1, H], dW2 [E, H, I], db13 [E, N1],
    db2 [E, H], dtopk_weights [T, k]. Pairs of non-local experts contribute nothing."""
    n_x, n_w13, n_w2, n_b13, n_b2, n_tw = (bool(n) for n in needs)
    acc = acc_dtype(grad_out, x, topk_weights)
    ex = _Experts(x, w13, w2, topk_weights, topk_ids, act, scheme, w13_scale, w2_scale, block, expert_map, acc)
    T, H = x.shape
    k, dev = ex.k, x.device
    zeros = lambda *shape: torch.zeros(*shape, dtype=acc, device=dev)  # noqa: E731
    dx = zeros(T, H) if n_x else None
    dw13 = zeros(w13.shape) if n_w13 else None
    dw2 = zeros(w2.shape) if n_w2 else None
    db13 = zeros(w13.shape[:2]) if n_b13 else None
    db2 = zeros(w2.shape[:2]) if n_b2 else None
    dtw = zeros(T, k) if n_tw else None
    through_gemm1 = n_x or n_w13 or n_b13 or (n_tw and on_input)
    for e, tok, slot, rw in ex.experts():
        W13, W2 = ex.weights(e)
        xe = x[tok].to(acc)
        a = ex.q(xe * rw if on_input else xe)  # straight-through: d q(a) / d a = 1
        if c1 is None:
            h1 = a @ W13.T + (w13_bias[e].to(acc) if w13_bias is not None else 0.0)
        else:
            h1 = c1[tok * k + slot].to(acc)
        h = ex.q(act.apply(h1, alpha, limit))
        g = grad_out[tok].to(acc)
        dh_u = g @ W2  # dL/dh before the router weight
        if n_tw and not on_input:  # dL/dw_j = <g_t, y_j> = <g_t W2, h_j> + <g_t, b2>
            dtw[tok, slot] = (dh_u * h).sum(-1) + (g @ w2_bias[e].to(acc) if w2_bias is not None else 0.0)
        dy = g if on_input else g * rw
        if n_w2:
            dw2[e] = dy.T @ h
        if n_b2:
            db2[e] = dy.sum(0)
        if not through_gemm1:
            continue
        dc1 = act.backward(h1, dh_u if on_input else dh_u * rw, alpha, limit)
        if n_w13:
            dw13[e] = dc1.T @ a
        if n_b13:
            db13[e] = dc1.sum(0)
        if n_x or (n_tw and on_input):
            da = dc1 @ W13
            if on_input:  # a_j = x_t·w_j
                if n_tw:
                    dtw[tok, slot] = (da * xe).sum(-1)
                da = da * rw
            if n_x:
                dx.index_add_(0, tok, da)
    return dx, dw13, dw2, db13, db2, dtw


# --------------------------------------------------------------------------------------------- routing
def topk_route_backward(router_logits: torch.Tensor, topk_ids: torch.Tensor, grad_weights: torch.Tensor,
                        renormalize: bool, scoring_func: str, routed_scaling_factor: float) -> torch.Tensor:
    """dL/d router_logits [T, E] (compute dtype) from dL/d topk_weights [T, k], for the selection ``topk_ids``.

    The selection (correction bias, grouped top-k, ties) is piecewise constant: only the weights carry a
    gradient. Non-finite logits (sanitized to -inf / ±FLT_MAX, docs/design.md §4) get 0. Plain torch ops
    on any device, no host sync: the CUDA path runs this too."""
    acc = acc_dtype(router_logits, grad_weights)
    x = torch.nan_to_num(router_logits.to(acc), nan=float("-inf"), posinf=FLT_MAX, neginf=-FLT_MAX)
    s = score(x, scoring_func)
    ids = topk_ids.long()
    gw = grad_weights.to(acc) * routed_scaling_factor
    if renormalize:  # w = r / max(Σr, tiny)
        r = s.gather(1, ids)
        total = r.sum(-1, keepdim=True)
        tiny = torch.finfo(torch.float32).tiny
        denom = total.clamp_min(tiny)
        gw = (gw - (gw * r / denom).sum(-1, keepdim=True) * (total > tiny)) / denom
    gs = torch.zeros_like(s).scatter_add_(1, ids, gw)
    if scoring_func == "sigmoid":
        gx = gs * s * (1.0 - s)
    else:
        gx = s * (gs - (gs * s).sum(-1, keepdim=True))
    return torch.where(torch.isfinite(router_logits), gx, 0.0)
