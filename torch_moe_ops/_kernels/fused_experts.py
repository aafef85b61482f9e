"""The fused-experts pipeline on Triton (docs/design.md §8): quantize A → align → GEMM1 (+bias) → activation
(+ re-quantize) → GEMM2 (+bias, × routing weight) → moe_sum. Same semantics as ``reference.fused_experts``;
arguments arrive validated and canonical from the ops layer, the scheme and activation as registry objects.

Everything stays on the device: no ``.item()``, no data-dependent shapes, every allocation is static in T,
so the whole call is CUDA-graph capturable. Pairs routed to non-local or out-of-range experts are dropped
by the alignment and never read; their rows of the GEMM2 buffer stay unwritten and ``moe_sum`` skips them
(no zero-fill of the [T·k, H] buffer).
"""
from __future__ import annotations

import dataclasses

import torch

from .._platform import debug_checks, fuse_activation
from ..schemes import Activation, QuantScheme
from .activation import act_and_mul, act_and_quant, quantize_activation
from .align import align_block_size
from .configs import get_config
from .gemm import invoke_moe_gemm
from .moe_sum import moe_sum
from .routing import pair_block_alignment, topk_route


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    act: Activation,
    scheme: QuantScheme,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    block: tuple[int, int] | None,
    expert_map: torch.Tensor | None,
    on_input: bool,
    alpha: float,
    limit: float,
    alignment: tuple | None = None,
) -> torch.Tensor:
    """Routed experts of one MoE layer; returns a fresh ``[T, H]`` tensor in ``x.dtype``.

    x: [T, H] bf16/fp16/fp32. w13: [E, N1, H / pack] (N1 = ``act.n1(I)``: 2I gated, I otherwise); w2:
    [E, H, I / pack]; both in ``scheme.weight_dtypes(x.dtype)`` (x's dtype, fp8 e4m3fn, int8, or uint8
    int4 pairs with pack = 2), last dim contiguous. topk_weights: [T, k] fp32; topk_ids: [T, k] int32/int64
    (global ids when ``expert_map`` [E_g] int32 is given; −1 entries there and out-of-range ids contribute
    0). Scales fp32 in the kernels' view (``scheme.canonical_scale``): per tensor w13 [E, 1|2], w2 [E, 1];
    per channel [E, N]; fp8_block [E, ceil(N/bn), ceil(K/bk)]; int4 [E, N, K / G]. block: canonical scale
    tile (None for untiled schemes). Biases: w13 [E, N1], w2 [E, H]. ``on_input``: GEMM1 reads
    ``x[t]·w[t, slot]`` and GEMM2 does not weight. alpha / limit: resolved floats (``act.alpha``,
    ``act.limit``). Intermediates are kept in x's dtype. ``alignment``: (sorted_ids, expert_ids,
    num_post_pad) already made for this call's BLOCK_M (``fused_moe``'s pair blocks), else aligned here.
    """
    aq = scheme.act
    group = scheme.act_group(block)
    pack = scheme.weight.pack if scheme.quantized else 1
    T, H = x.shape
    E, N1 = w13.shape[0], w13.shape[1]
    I = w2.shape[2] * pack
    k = topk_ids.shape[1]
    numel = T * k
    device = x.device
    if numel == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=device)

    # One BLOCK_M for both GEMMs: they share the alignment.
    cfg1 = get_config(T, E, N1, H, scheme, block, device, top_k=k)
    cfg2 = get_config(T, E, H, I, scheme, block, device, top_k=k)
    cfg2 = dataclasses.replace(cfg2, block_m=cfg1.block_m)
    num_experts = E if expert_map is None else expert_map.numel()
    if alignment is None:
        alignment = align_block_size(topk_ids, num_experts, cfg1.block_m, expert_map)
    sorted_ids, expert_ids, num_post_pad = alignment

    if on_input:
        # Each pair gets its own weighted copy of its token: GEMM1 then reads row j, not j // k.
        a1 = (x.float().unsqueeze(1) * topk_weights.float().unsqueeze(2)).view(numel, H)
        a1 = a1 if aq is not None else a1.to(x.dtype)  # quantize straight from fp32
        a1_rows_per_pair = 1
    else:
        a1, a1_rows_per_pair = x, k
    a1_scale = None
    if aq is not None:
        a1, a1_scale = quantize_activation(a1, aq, group)

    gemm_args = (sorted_ids, expert_ids, num_post_pad)
    gemm1 = dict(top_k=a1_rows_per_pair, config=cfg1, scheme=scheme, a_scale=a1_scale, w_scale=w13_scale,
                 bias=w13_bias, block=block, interleaved=act.interleaved)
    if aq is None and act.gated and fuse_activation():  # GEMM1's epilogue writes the activation's output
        a2, a2_scale = torch.empty((numel, N1 // 2), dtype=x.dtype, device=device), None
        invoke_moe_gemm(a1, w13, a2, *gemm_args, act=(act, alpha, limit), **gemm1)
    else:
        c1 = torch.empty((numel, N1), dtype=x.dtype, device=device)
        invoke_moe_gemm(a1, w13, c1, *gemm_args, **gemm1)
        # Rows of c1 for dropped pairs are garbage; the activation maps them to garbage that GEMM2 never reads.
        if aq is None:
            a2, a2_scale = act_and_mul(c1, act, alpha, limit), None
        else:
            a2, a2_scale = act_and_quant(c1, act, alpha, limit, aq, group)

    # Rows of dropped pairs are never written by GEMM2: moe_sum skips them, k == 1 returns c3 itself (zeroed).
    c3 = (torch.zeros if k == 1 else torch.empty)((numel, H), dtype=x.dtype, device=device)
    if k > 1 and debug_checks():
        c3.fill_(float("nan"))  # poison: a read of an unwritten row shows up as NaN in the output
    invoke_moe_gemm(
        a2, w2, c3, *gemm_args, top_k=1, config=cfg2, scheme=scheme,
        a_scale=a2_scale, w_scale=w2_scale, bias=w2_bias, block=block,
        topk_weights=None if on_input else topk_weights,
    )
    if k == 1:  # [T, 1, H] is already the sum; c3 is a fresh tensor
        return c3
    return moe_sum(c3.view(T, k, H), topk_ids=topk_ids, expert_map=expert_map, num_experts=num_experts)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, routing: tuple, experts: tuple) -> torch.Tensor:
    """Routing then the experts (``moe::fused_moe``): ``routing`` = topk_route's arguments after
    (router_logits), ``experts`` = ``fused_experts``' arguments after (x, ..., topk_ids), i.e. from ``w13``
    on without the routing outputs: (w13, w2, act, scheme, scales, biases, block, expert_map, on_input,
    alpha, limit). At T = 1 the routing kernel also writes the GEMMs' alignment, one pair per block
    (``routing.pair_block_alignment``): the top-k experts of one token are distinct, so each expert's weights
    are still read once, and the alignment kernel's launch goes."""
    w13, w2, act, scheme, w13_scale, w2_scale, w13_bias, w2_bias, block, expert_map, on_input, alpha, limit = experts
    T, k = x.shape[0], routing[0]
    alignment = pair_blocks = None
    if isinstance(T, int) and T == 1:
        cfg1 = get_config(T, w13.shape[0], w13.shape[1], x.shape[1], scheme, block, x.device, top_k=k)
        alignment = pair_block_alignment(T, k, cfg1.block_m, x.device)
        pair_blocks = (alignment, cfg1.block_m, w13.shape[0], expert_map)
    weights, ids = topk_route(router_logits, *routing, pair_blocks=pair_blocks)
    return fused_experts(x, w13, w2, weights, ids, act, scheme, w13_scale, w2_scale, w13_bias, w2_bias, block,
                         expert_map, on_input, alpha, limit, alignment=alignment)
