"""The fused-experts pipeline on Triton (spec §8): quantize A → align → GEMM1 (+bias) → activation
(+ re-quantize) → GEMM2 (+bias, × routing weight) → moe_sum. Same signature and semantics as
``reference.fused_experts``; arguments arrive validated and canonical from the ops layer.

Everything stays on the device: no ``.item()``, no data-dependent shapes, every allocation is static in T,
so the whole call is CUDA-graph capturable. Pairs routed to non-local or out-of-range experts are dropped
by the alignment and never read; their rows of the GEMM2 buffer stay unwritten and ``moe_sum`` skips them
(no zero-fill of the [T·k, H] buffer).
"""
from __future__ import annotations

import dataclasses

import torch

from .._platform import debug_checks
from .._spec import DEFAULT_BLOCK_SHAPE, EXPERT_SCHEMES, canonical_activation
from .activation import act_and_mul, act_and_quant, moe_sum
from .align import align_block_size
from .configs import get_config
from .gemm import invoke_moe_gemm
from .quant import quantize_activation


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    quant_scheme: str = "none",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    block_shape=None,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    activation_alpha: float = 1.702,
    activation_limit: float = 0.0,
) -> torch.Tensor:
    """Routed experts of one MoE layer; returns a fresh ``[T, H]`` tensor in ``hidden_states.dtype``.

    hidden_states: [T, H] bf16/fp16/fp32. w13: [E, N1, H] (N1 = 2I gated, I for ``*_no_mul``); w2: [E, H, I];
    both in x's dtype, fp8 e4m3fn (fp8 schemes) or int8 (``int8_w8a16``), last dim contiguous.
    topk_weights: [T, k] fp32; topk_ids: [T, k] int32/int64 (global ids when ``expert_map`` [E_g] int32 is
    given; −1 entries there and out-of-range ids contribute 0). Scales (fp32): fp8_tensor w13 [E, 1|2],
    w2 [E, 1]; fp8_channel / int8_w8a16 [E, N]; fp8_block [E, ceil(N/bn), ceil(K/bk)]. Biases: w13 [E, N1],
    w2 [E, H]. With ``apply_router_weight_on_input`` GEMM1 reads ``x[t]·w[t, slot]`` and GEMM2 does not
    weight. Intermediates are kept in x's dtype.
    """
    activation = canonical_activation(activation)
    act_scheme = EXPERT_SCHEMES[quant_scheme][1]
    block_shape = tuple(block_shape or DEFAULT_BLOCK_SHAPE) if quant_scheme == "fp8_block" else None
    group_size = block_shape[1] if block_shape is not None else DEFAULT_BLOCK_SHAPE[1]
    x = hidden_states
    T, H = x.shape
    E, N1 = w13.shape[0], w13.shape[1]
    I = w2.shape[2]
    k = topk_ids.shape[1]
    numel = T * k
    device = x.device
    if numel == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=device)

    # One BLOCK_M for both GEMMs: they share the alignment.
    cfg1 = get_config(T, E, N1, H, quant_scheme, block_shape, device, top_k=k)
    cfg2 = get_config(T, E, H, I, quant_scheme, block_shape, device, top_k=k)
    cfg2 = dataclasses.replace(cfg2, block_m=cfg1.block_m)
    num_experts = E if expert_map is None else expert_map.numel()
    sorted_ids, expert_ids, num_post_pad = align_block_size(topk_ids, num_experts, cfg1.block_m, expert_map)

    if apply_router_weight_on_input:
        # Each pair gets its own weighted copy of its token: GEMM1 then reads row j, not j // k.
        a1 = (x.float().unsqueeze(1) * topk_weights.float().unsqueeze(2)).view(numel, H)
        a1 = a1 if act_scheme is not None else a1.to(x.dtype)  # quantize straight from fp32
        a1_rows_per_pair = 1
    else:
        a1, a1_rows_per_pair = x, k
    a1_scale = None
    if act_scheme is not None:
        a1, a1_scale = quantize_activation(a1, act_scheme, group_size)

    gemm_args = (sorted_ids, expert_ids, num_post_pad)
    c1 = torch.empty((numel, N1), dtype=x.dtype, device=device)
    invoke_moe_gemm(
        a1, w13, c1, *gemm_args, top_k=a1_rows_per_pair, config=cfg1, scheme=quant_scheme,
        a_scale=a1_scale, w_scale=w13_scale, bias=w13_bias, block_shape=block_shape,
        interleaved=activation == "swigluoai",
    )
    # Rows of c1 for dropped pairs are garbage; the activation maps them to garbage that GEMM2 never reads.
    if act_scheme is None:
        a2, a2_scale = act_and_mul(c1, activation, activation_alpha, activation_limit), None
    else:
        a2, a2_scale = act_and_quant(c1, activation, activation_alpha, activation_limit, act_scheme, group_size)

    # Rows of dropped pairs are never written by GEMM2: moe_sum skips them, k == 1 returns c3 itself (zeroed).
    c3 = (torch.zeros if k == 1 else torch.empty)((numel, H), dtype=x.dtype, device=device)
    if k > 1 and debug_checks():
        c3.fill_(float("nan"))  # poison: a read of an unwritten row shows up as NaN in the output
    invoke_moe_gemm(
        a2, w2, c3, *gemm_args, top_k=1, config=cfg2, scheme=quant_scheme,
        a_scale=a2_scale, w_scale=w2_scale, bias=w2_bias, block_shape=block_shape,
        topk_weights=None if apply_router_weight_on_input else topk_weights,
    )
    if k == 1:  # [T, 1, H] is already the sum; c3 is a fresh tensor
        return c3
    return moe_sum(c3.view(T, k, H), topk_ids=topk_ids, expert_map=expert_map, num_experts=num_experts)
