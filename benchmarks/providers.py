"""Provider registry: each provider turns a prepared case into a zero-argument callable to time.

A provider is ``fn(case) -> callable | None`` (None = does not support this case). ``case`` holds
x [T, H] bf16, routing (topk_weights [T, k] fp32, topk_ids [T, k] int32, router_logits), the bf16 weights
and, per scheme, the quantized weights and scales (``q13``, ``q2``, ``s13``, ``s2``), the ``QuantScheme``
(``qscheme``) and its ``fused_experts`` keywords (``quant``). Providers marked ``graph=True`` are captured in
a CUDA graph and timed by replay (routing precomputed for every provider, as in the peers' baselines). The
peers have no int4 path: ``int4_w4a16`` cells time ours only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import torch_moe_ops as moe
from torch_moe_ops.schemes import get_activation


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable
    graph: bool = True


REGISTRY: dict[str, Provider] = {}


def register(name: str, graph: bool = True):
    def wrap(fn):
        REGISTRY[name] = Provider(name, fn, graph)
        return fn

    return wrap


def act_and_mul(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The peers' activation in eager PyTorch (the registry's fp32 reference, defaults as in our op)."""
    return get_activation(activation).reference(h).to(h.dtype)


def _bias_kwargs(case):
    return dict(w13_bias=case.b13, w2_bias=case.b2) if case.b13 is not None else {}


@register("ours")
def ours(case):
    """torch_moe_ops.fused_experts: alignment, quantization, both GEMMs, activation, sum."""
    kw = dict(activation=case.shape.activation, **_bias_kwargs(case), **case.quant)
    return lambda: moe.fused_experts(case.x, case.q13, case.q2, case.topk_weights, case.topk_ids, **kw)


@register("ours_invariant")
def ours_invariant(case):
    """torch_moe_ops.fused_experts in batch-invariant mode (docs/batch-invariance.md): its cost is this / ours."""
    kw = dict(activation=case.shape.activation, **_bias_kwargs(case), **case.quant, batch_invariant=True)
    return lambda: moe.fused_experts(case.x, case.q13, case.q2, case.topk_weights, case.topk_ids, **kw)


def _swapped(case, **extra):
    """``fused_experts`` with ``TORCH_MOE_OPS_SWAP_AB=1`` for its own call (docs/kernels.md, "Swapped operands"),
    converted-weight schemes only. Launch plans are read when recorded, so each call clears them before and
    after: no plan of one setting is replayed under the other."""
    if not case.qscheme.flags.W_CAST:
        return None
    from torch_moe_ops._platform import SWAP_AB_ENV

    kw = dict(activation=case.shape.activation, **_bias_kwargs(case), **case.quant, **extra)

    def call():
        import os

        moe.clear_launch_plans()
        before = os.environ.get(SWAP_AB_ENV)
        os.environ[SWAP_AB_ENV] = "1"
        try:
            return moe.fused_experts(case.x, case.q13, case.q2, case.topk_weights, case.topk_ids, **kw)
        finally:  # the caller's setting back, whatever it was
            if before is None:
                del os.environ[SWAP_AB_ENV]
            else:
                os.environ[SWAP_AB_ENV] = before
            moe.clear_launch_plans()

    return call


@register("ours_swapped")
def ours_swapped(case):
    """``ours`` with swapped operands: the switch's gain is ours / this."""
    return _swapped(case)


@register("ours_invariant_swapped")
def ours_invariant_swapped(case):
    """``ours_invariant`` with swapped operands (token-sized invariant tiles): its cost is this / ours."""
    return _swapped(case, batch_invariant=True)


@register("ours_fused_moe")
def ours_fused_moe(case):
    """torch_moe_ops.fused_moe: the same plus routing."""
    kw = dict(activation=case.shape.activation, **_bias_kwargs(case), **case.shape.routing, **case.quant)
    if case.bias13 is not None:
        kw["e_score_correction_bias"] = case.bias13
    return lambda: moe.fused_moe(case.x, case.router_logits, case.q13, case.q2, case.shape.k, **kw)


def _sort_by_expert(case):
    flat = case.topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(case.shape.E, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))  # sync-free histogram
    return order, torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_pipeline(case, gemm1, gemm2):
    k, act = case.shape.k, case.shape.activation

    def run():
        order, offs = _sort_by_expert(case)
        a = case.x[order // k]
        h = gemm1(a, offs)
        if case.b13 is not None:
            experts = case.topk_ids.flatten()[order].long()
            h = h + case.b13[experts]
        y = gemm2(act_and_mul(h, act), offs)
        if case.b2 is not None:
            y = y + case.b2[experts]
        y = y.float() * case.topk_weights.flatten()[order, None]
        out = torch.zeros(case.x.shape, dtype=torch.float32, device=case.x.device)
        out.index_add_(0, order // k, y)
        return out.to(case.x.dtype)

    return run


@register("grouped_mm")
def grouped_mm(case):
    """PyTorch pipeline: argsort, gather, F.grouped_mm, act, F.grouped_mm, weighted index_add."""
    if case.qscheme.quantized or not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return None
    gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    w13t, w2t = case.w13.transpose(-2, -1), case.w2.transpose(-2, -1)
    return _grouped_pipeline(case, lambda a, offs: gmm(a, w13t, offs=offs), lambda h, offs: gmm(h, w2t, offs=offs))


@register("scaled_grouped_mm")
def scaled_grouped_mm(case):
    """The same with F.scaled_grouped_mm (fp8 row-wise: per-channel weights, per-token activations)."""
    flags = case.qscheme.flags  # exactly fp8 per-channel weights with per-token fp8 activations
    if not (flags.A_ROW_SCALE and flags.W_CHANNEL_SCALE) or not hasattr(F, "scaled_grouped_mm") \
            or case.shape.H % 16 or case.shape.I % 16:
        return None
    w13t, w2t = case.q13.transpose(-2, -1), case.q2.transpose(-2, -1)
    rowwise = F.ScalingType.RowWise

    def gemm(a, wt, scale_b, offs):
        qa, sa = moe.quantize_activation(a.contiguous(), "fp8_token")
        return F.scaled_grouped_mm(qa, wt, sa.flatten(), rowwise, scale_b, rowwise, offs=offs,
                                   output_dtype=torch.bfloat16)

    return _grouped_pipeline(case, lambda a, offs: gemm(a, w13t, case.s13, offs),
                             lambda h, offs: gemm(h, w2t, case.s2, offs))


@register("naive", graph=False)
def naive(case):
    """Per-expert loop in eager PyTorch (the classic Hugging Face implementation; host syncs)."""
    if case.qscheme.quantized or case.x.shape[0] > 1024:
        return None
    act, E = case.shape.activation, case.shape.E

    def run():
        out = torch.zeros(case.x.shape, dtype=torch.float32, device=case.x.device)
        for e in range(E):
            tok, slot = torch.where(case.topk_ids == e)
            if tok.numel() == 0:
                continue
            h = case.x[tok] @ case.w13[e].T
            if case.b13 is not None:  # the same function as ours: biases included (GPT-OSS)
                h = h + case.b13[e]
            y = act_and_mul(h, act) @ case.w2[e].T
            if case.b2 is not None:
                y = y + case.b2[e]
            out.index_add_(0, tok, y.float() * case.topk_weights[tok, slot, None])
        return out.to(case.x.dtype)

    return run
