"""Shared pieces of the fused-experts / GEMM kernel tests: the kernel called the way the ops layer calls
it, random routing and weights, the error metric and its bounds."""
from __future__ import annotations

import torch

from torch_moe_ops._kernels import fused_experts as kernels
from torch_moe_ops.schemes import get_activation, get_quant_scheme

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SCHEME = {"fp8_tensor": "fp8_tensor", "fp8_channel": "fp8_channel", "fp8_block": "fp8_block",
                 "int8_w8a16": "int8_channel", "int4_w4a16": "int4_group"}
INT4 = get_quant_scheme("int4_w4a16")
#: ||out - ref|| / ||ref|| bounds. Unquantized: intermediates rounded to x's dtype (bf16 keeps 8 mantissa
#: bits, ~1e-3 per rounding, a handful in sequence) against an fp32 reference: measured ~6e-3 for bf16.
#: fp8 (e4m3, 3 mantissa bits: one step is 1/8 of a binade; the quantization itself costs ~6e-2 here):
#: kernel and reference quantize x identically, but the kernel re-quantizes GEMM1's output after rounding
#: it to x's dtype, so a few percent of elements land one fp8 step apart. Measured on 3 seeds x 3 schemes:
#: bf16 1.0-1.5e-2, fp16 <= 4e-3, fp32 <= 2e-4. Floors at ~2x the worst seen (SQNR >= 32 dB for bf16)
#: still catch any wrong scale or dropped term (a scale 10 % off alone gives ~1e-1).
REL_TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}
REL_TOL_FP8 = {"bf16": 2.5e-2, "fp16": 1e-2, "fp32": 1e-3}


def fused_experts(x, w13, w2, topk_weights, topk_ids, activation="silu", quant_scheme="none", w13_scale=None,
                  w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None, expert_map=None,
                  apply_router_weight_on_input=False, activation_alpha=None, activation_limit=None):
    """The kernel pipeline called the way the ops layer calls it: names resolved into registry objects,
    scales in the kernels' view, the scale tile canonical, alpha / limit resolved to floats."""
    act, scheme = get_activation(activation), get_quant_scheme(quant_scheme)
    s13 = scheme.canonical_scale(w13_scale) if w13_scale is not None else None
    s2 = scheme.canonical_scale(w2_scale) if w2_scale is not None else None
    return kernels.fused_experts(x, w13, w2, topk_weights, topk_ids, act, scheme, s13, s2, w13_bias, w2_bias,
                                 scheme.block_shape(block_shape), expert_map, apply_router_weight_on_input,
                                 act.alpha(activation_alpha), act.limit(activation_limit))


def _routing(T, E_g, k, mode, gen):
    """[T, k] fp32 weights and int32 ids; modes: random, empty (odd experts unused), one (all on 0..k-1)."""
    logits = torch.randn(T, E_g, generator=gen)
    if mode == "empty":
        logits[:, 1::2] = -float("inf")
    if mode == "one":
        logits = torch.arange(E_g, 0, -1, dtype=torch.float32).expand(T, E_g).clone()
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return w.contiguous(), ids.to(torch.int32)


def _weights(E, N, K, gen, strided, scale=0.1):
    """randn/10 [E, N, K]; ``strided`` gives a view with padded row and expert strides."""
    if not strided:
        return torch.randn(E, N, K, generator=gen) * scale
    return (torch.randn(E, N + 3, K + 128, generator=gen) * scale)[:, :N, :K]


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
