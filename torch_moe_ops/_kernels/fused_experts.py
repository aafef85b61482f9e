"""The fused-experts pipeline on Triton (docs/design.md §8): quantize A → align → GEMM1 (+bias) → activation
(+ re-quantize) → GEMM2 (+bias, × routing weight) → moe_sum. Same semantics as ``reference.fused_experts``;
arguments arrive validated and canonical from the ops layer, the scheme and activation as registry objects.

Everything stays on the device: no ``.item()``, no data-dependent shapes, every allocation is static in T,
so the whole call is CUDA-graph capturable. Pairs routed to non-local or out-of-range experts are dropped
by the alignment and never read; their rows of the GEMM2 buffer stay unwritten and ``moe_sum`` skips them
(no zero-fill of the [T·k, H] buffer).
"""
from __future__ import annotations

import torch

from .._platform import DECODE_TOKENS, debug_checks, fuse_activation, fuse_routing, fuse_sum
from ..schemes import Activation, QuantScheme, cdiv
from .activation import act_and_mul, act_and_quant, quant_buffers, quantize_activation
from .align import align_buffers
from .configs import get_config
from .gemm import dependent_launch, invoke_moe_gemm, prefetches, quantizes_input
from .moe_sum import SlotSum, moe_sum
from .routing import invariant_alignment, one_program, rows_apart, topk_route


def gemm1_input(x, w13, topk_weights, topk_ids, scheme: QuantScheme, block, expert_map, on_input: bool,
                alignment: tuple | None = None, invariant: bool = False):
    """Steps 1-2 (docs/design.md §8), shared by the forward and the backward: (GEMM1's tiles, the alignment
    (sorted_ids, expert_ids, num_post_pad) for its BLOCK_M, GEMM1's input a1 before activation quantization
    [T or T·k, H], a1's rows per pair: k (row j // k of x) or 1 (one weighted copy per pair, on_input)).
    ``invariant``: batch-invariant tiles (docs/batch-invariance.md)."""
    (T, H), (E, N1), k = x.shape, w13.shape[:2], topk_ids.shape[1]
    cfg1 = get_config(T, E, N1, H, scheme, block, x.device, top_k=k, invariant=invariant, dtype=x.dtype)
    if alignment is None:
        alignment = invariant_alignment(topk_ids, E if expert_map is None else expert_map.numel(), cfg1.block_m,
                                        expert_map, invariant)
    if not on_input:
        return cfg1, alignment, x, k
    # Each pair gets its own weighted copy of its token: GEMM1 then reads row j, not j // k.
    a1 = (x.float().unsqueeze(1) * topk_weights.float().unsqueeze(2)).view(T * k, H)
    return cfg1, alignment, (a1 if scheme.act is not None else a1.to(x.dtype)), 1  # fp8: quantized from fp32


def gemm1(a1, a1_div: int, w13, out, alignment, cfg1, scheme: QuantScheme, w13_scale, w13_bias, block,
          act: Activation, fused: tuple | None = None, a1_quant: tuple | None = None, invariant: bool = False,
          zero_counts: tuple | None = None, pair_ids: tuple | None = None, route: tuple | None = None,
          act_dtype: torch.dtype | None = None, prefetch: torch.Tensor | None = None, pdl: int = 0) -> None:
    """Step 3: ``out`` [T·k, N1] (or [T·k, N1/2] with ``fused`` = (act, alpha, limit): the activation in the
    epilogue; ``act_dtype``: GEMM1's output rounded to it first, ``out`` fp32) = a1 (quantized first for fp8
    schemes, unless ``a1_quant`` = (q, scale) already holds that, or, with ``pair_ids`` at T = 1, by GEMM1 itself
    where its tiles allow) @ W13ᵀ + bias, rows of dropped pairs untouched. ``invariant``: ``cfg1`` is a
    batch-invariant config. ``zero_counts``: (GEMM2's fused-sum counters, a static bound on their number), which
    this launch clears. ``pair_ids`` / ``route``: T = 1's pairs instead of the alignment (``invoke_moe_gemm``);
    ``prefetch``: GEMM2's weights, which GEMM1 then brings into L2 (``gemm.prefetches``); ``pdl``: 1 when GEMM2
    follows as a programmatic dependent launch (``gemm.dependent_launch``)."""
    a1_scale = None
    quant_a = (pair_ids is not None and a1_quant is None and scheme.act is not None
               and quantizes_input(scheme, block, cfg1))
    if a1_quant is not None:
        a1, a1_scale = a1_quant
    elif scheme.act is not None and not quant_a:
        a1, a1_scale = quantize_activation(a1, scheme.act, scheme.act_group(block))
    invoke_moe_gemm(a1, w13, out, *alignment, top_k=a1_div, config=cfg1, scheme=scheme, a_scale=a1_scale,
                    w_scale=w13_scale, bias=w13_bias, block=block, interleaved=act.interleaved, act=fused,
                    invariant=invariant, zero_counts=zero_counts, pair_ids=pair_ids, route=route, quant_a=quant_a,
                    act_dtype=act_dtype, prefetch=prefetch, pdl=pdl)


def gemm2_input(c1, act: Activation, alpha: float, limit: float, scheme: QuantScheme, block):
    """Step 4: GEMM2's input from GEMM1's output c1 [T·k, N1]: (a2 [T·k, I] in c1's dtype, None), or fp8
    with its scales for fp8 schemes. Rows of dropped pairs map garbage to garbage that GEMM2 never reads."""
    if scheme.act is None:
        return act_and_mul(c1, act, alpha, limit), None
    return act_and_quant(c1, act, alpha, limit, scheme.act, scheme.act_group(block))


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
    keep_c1: bool = False,
    invariant: bool = False,
    a1_quant: tuple | None = None,
    route: tuple | None = None,
):
    """Routed experts of one MoE layer; returns a fresh ``[T, H]`` tensor in ``x.dtype`` (``keep_c1``: and
    GEMM1's output c1 [T·k, N1] for the backward, rows of dropped pairs 0).

    x: [T, H] bf16/fp16/fp32. w13: [E, N1, H / pack] (N1 = ``act.n1(I)``: 2I gated, I otherwise); w2:
    [E, H, I / pack]; both in ``scheme.weight_dtypes(x.dtype)`` (x's dtype, fp8 e4m3fn, int8, or uint8
    int4 pairs with pack = 2), last dim contiguous. topk_weights: [T, k] fp32; topk_ids: [T, k] int32/int64
    (global ids when ``expert_map`` [E_g] int32 is given; −1 entries there and out-of-range ids contribute
    0). Scales fp32 in the kernels' view (``scheme.canonical_scale``): per tensor w13 [E, 1|2], w2 [E, 1];
    per channel [E, N]; fp8_block [E, ceil(N/bn), ceil(K/bk)]; int4 [E, N, K / G]. block: canonical scale
    tile (None for untiled schemes). Biases: w13 [E, N1], w2 [E, H]. ``on_input``: GEMM1 reads
    ``x[t]·w[t, slot]`` and GEMM2 does not weight. alpha / limit: resolved floats (``act.alpha``,
    ``act.limit``). Intermediates are kept in x's dtype. ``alignment``: (sorted_ids, expert_ids,
    num_post_pad) already made for this call's BLOCK_M (by ``fused_moe``'s routing kernel), else aligned here.
    ``invariant``: batch-invariant tiles: every T computes a row the same way (docs/batch-invariance.md).
    ``a1_quant``: (q [T, H] fp8, scale) = ``quantize_activation(x)``, made by ``fused_moe``'s routing kernel.
    At T = 1 no alignment is made: each GEMM puts pair j alone in its row block j and reads its expert from the
    ids (``invoke_moe_gemm``'s ``pair_ids``), and GEMM2 also sums the slots (``moe_sum``'s bits;
    ``TORCH_MOE_OPS_FUSE_SUM=0``: not); fp8 schemes' GEMMs quantize their own input rows where their tiles allow
    (``gemm.quantizes_input``), GEMM1's output staying fp32 for GEMM2 to quantize; so a call makes two launches
    (docs/kernels.md, "Two launches at T = 1"). With ``TORCH_MOE_OPS_FUSE_SUM=1`` GEMM2 also sums the slots on
    aligned rows up to 16 tokens (``_platform.fuse_sum``).
    ``route``: (router_logits [1, E], topk_route's arguments after the logits): GEMM1 routes the token itself (and
    quantizes x for fp8 schemes) and fills ``topk_weights`` and ``topk_ids`` (empty [1, k] fp32 / int32 buffers)
    for GEMM2 (``fused_moe``).
    """
    pack = scheme.weight.pack if scheme.quantized else 1
    T, H = x.shape
    E, N1 = w13.shape[0], w13.shape[1]
    I = w2.shape[2] * pack
    k = topk_ids.shape[1]
    numel = T * k
    device = x.device
    if numel == 0:
        out = torch.zeros((T, H), dtype=x.dtype, device=device)
        return (out, x.new_zeros((0, N1))) if keep_c1 else out

    direct = isinstance(T, int) and T == 1  # one pair a row block, the experts read from the ids
    assert route is None or (direct and not on_input and a1_quant is None)
    pair_ids = (topk_ids, expert_map) if direct else None
    route1 = (*route, topk_weights) if route is not None else None  # GEMM1 writes the routing GEMM2 reads
    # One BLOCK_M for both GEMMs: they share the alignment (none at T = 1: "made" as three Nones)
    cfg1, alignment, a1, a1_div = gemm1_input(x, w13, topk_weights, topk_ids, scheme, block, expert_map, on_input,
                                              (None, None, None) if direct else alignment, invariant)
    cfg2 = get_config(T, E, H, I, scheme, block, device, top_k=k, invariant=invariant, dtype=x.dtype,
                      block_m=cfg1.block_m)
    sums = zero = None  # GEMM2 sums the slots: out [T, H], a counter a (token, column block), cleared by GEMM1
    if k > 1 and fuse_sum(T):  # (topk_ids: contiguous, checked)
        n_cb = cdiv(H, cfg2.block_n)
        counts = torch.empty(T * n_cb, dtype=torch.int32, device=device)
        sums = SlotSum(torch.empty((T, H), dtype=x.dtype, device=device), counts,
                       None if direct else topk_ids, expert_map, 1 if direct else DECODE_TOKENS)
        zero = (counts, sums.max_tokens * n_cb)
    c1 = None
    pf = w2 if direct and prefetches(w2, k) else None  # GEMM1 brings GEMM2's weights into L2
    # fp8 at T = 1: GEMM1's epilogue applies the activation (output kept in fp32) and GEMM2 quantizes its rows
    quant_a2 = direct and scheme.act is not None and quantizes_input(scheme, block, cfg2)
    pdl = 0  # GEMM2 right after GEMM1 (activation fused) at T = 1: launched while GEMM1 runs
    if not keep_c1 and act.gated and fuse_activation(T, invariant) and (scheme.act is None or quant_a2):
        a2_dtype = x.dtype if scheme.act is None else torch.float32
        a2, a2_scale = torch.empty((numel, N1 // 2), dtype=a2_dtype, device=device), None
        pdl = 1 if direct and dependent_launch(device) else 0
        gemm1(a1, a1_div, w13, a2, alignment, cfg1, scheme, w13_scale, w13_bias, block, act,
              fused=(act, alpha, limit), a1_quant=a1_quant, invariant=invariant, zero_counts=zero,
              pair_ids=pair_ids, route=route1, act_dtype=x.dtype, prefetch=pf, pdl=pdl)
    else:
        quant_a2 = False
        c1 = (torch.zeros if keep_c1 else torch.empty)((numel, N1), dtype=x.dtype, device=device)
        gemm1(a1, a1_div, w13, c1, alignment, cfg1, scheme, w13_scale, w13_bias, block, act, a1_quant=a1_quant,
              invariant=invariant, zero_counts=zero, pair_ids=pair_ids, route=route1, prefetch=pf)
        a2, a2_scale = gemm2_input(c1, act, alpha, limit, scheme, block)

    # Rows of dropped pairs are never written by GEMM2: moe_sum skips them, k == 1 returns c3 itself (zeroed).
    c3 = (torch.zeros if k == 1 else torch.empty)((numel, H), dtype=x.dtype, device=device)
    if k > 1 and debug_checks():
        c3.fill_(float("nan"))  # poison: a read of an unwritten row shows up as NaN in the output
    invoke_moe_gemm(
        a2, w2, c3, *alignment, top_k=1, config=cfg2, scheme=scheme,
        a_scale=a2_scale, w_scale=w2_scale, bias=w2_bias, block=block,
        topk_weights=None if on_input else topk_weights, invariant=invariant, sum_into=sums, pair_ids=pair_ids,
        quant_a=quant_a2, pdl=2 if pdl else 0,
    )
    if sums is not None:
        out = sums.out
    elif k == 1:  # [T, 1, H] is already the sum; c3 is a fresh tensor
        out = c3
    else:
        num_experts = E if expert_map is None else expert_map.numel()
        out = moe_sum(c3.view(T, k, H), topk_ids=topk_ids, expert_map=expert_map, num_experts=num_experts)
    return (out, c1) if keep_c1 else out


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, routing: tuple, experts: tuple,
              invariant: bool = False) -> torch.Tensor:
    """Routing then the experts (``moe::fused_moe``): ``routing`` = topk_route's arguments after
    (router_logits), ``experts`` = ``fused_experts``' arguments after (x, ..., topk_ids), i.e. from ``w13``
    on without the routing outputs: (w13, w2, act, scheme, scales, biases, block, expert_map, on_input,
    alpha, limit). At T = 1 without on-input weighting GEMM1 routes the token (``fused_experts``' ``route``; fp8:
    and quantizes x, where its tiles allow: ``gemm.quantizes_input``): no routing launch
    (``TORCH_MOE_OPS_FUSE_ROUTING=0``: not). Up to the routing kernel's BLOCK_T tokens
    (one program routes them all: ``routing.one_program``, by token bucket) it writes ``align_block_size``'s
    alignment itself, and the alignment's launch goes. For fp8 schemes the routing kernel also quantizes x
    (GEMM1's input, the bits of ``quantize_activation``; not with ``on_input``, whose GEMM1 input is weighted per
    pair): one launch fewer at every T. ``invariant``: as in ``fused_experts`` (the routing is per token in any
    mode: ``docs/batch-invariance.md``)."""
    w13, w2, act, scheme, w13_scale, w2_scale, w13_bias, w2_bias, block, expert_map, on_input, alpha, limit = experts
    T, k = x.shape[0], routing[0]
    t1 = isinstance(T, int) and T == 1  # (a symbolic T is never 1: torch.compile specializes 1)
    if t1 and not on_input and fuse_routing() and (scheme.act is None or quantizes_input(
            scheme, block, get_config(1, *w13.shape[:2], x.shape[1], scheme, block, x.device, top_k=k,
                                      invariant=invariant, dtype=x.dtype))):
        weights = torch.empty((1, k), dtype=torch.float32, device=x.device)
        ids = torch.empty((1, k), dtype=torch.int32, device=x.device)
        return fused_experts(x, w13, w2, weights, ids, act, scheme, w13_scale, w2_scale, w13_bias, w2_bias, block,
                             expert_map, on_input, alpha, limit, invariant=invariant, route=(router_logits, routing))
    alignment = align = None
    E_ids = router_logits.shape[1]  # the ids' range (expert_map's length under EP)
    if not t1 and one_program(T, E_ids, routing[3]) and not rows_apart(invariant):
        bm = get_config(T, w13.shape[0], w13.shape[1], x.shape[1], scheme, block, x.device, top_k=k,
                        invariant=invariant, dtype=x.dtype).block_m
        alignment = align_buffers(T * k, E_ids, bm, x.device)
        align = (alignment, bm, expert_map)
    quant_x = a1_quant = None
    if scheme.act is not None and not on_input:
        group = scheme.act_group(block) if scheme.act.grouped else 0
        a1_quant = quant_buffers(T, x.shape[1], scheme.act, group, x.device)
        quant_x = (x, *a1_quant, group)
    weights, ids = topk_route(router_logits, *routing, quant_x=quant_x, align=align)
    return fused_experts(x, w13, w2, weights, ids, act, scheme, w13_scale, w2_scale, w13_bias, w2_bias, block,
                         expert_map, on_input, alpha, limit, alignment=alignment, invariant=invariant,
                         a1_quant=a1_quant)
