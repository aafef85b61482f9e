"""Numerics helpers shared by tests, benchmarks and the demo."""
from __future__ import annotations

import torch


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10*log10(|ref|^2 / |ref - test|^2), in dB (inf when equal)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))  # host-ok: test utility


def rel_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """||ref - test|| / ||ref||."""
    ref, test = ref.double(), test.double()
    return float((ref - test).norm() / ref.norm().clamp_min(1e-30))  # host-ok: test utility


def random_moe_weights(E: int, H: int, I: int, *, gated: bool = True, dtype=torch.bfloat16, device="cpu",
                       scale: float = 0.1, bias: bool = False, generator=None):
    """Random expert weights ``randn * scale``: w13 [E, 2I or I, H], w2 [E, H, I], optional biases."""
    n1 = 2 * I if gated else I
    w13 = (torch.randn(E, n1, H, generator=generator) * scale).to(dtype=dtype, device=device)
    w2 = (torch.randn(E, H, I, generator=generator) * scale).to(dtype=dtype, device=device)
    if not bias:
        return w13, w2, None, None
    b13 = (torch.randn(E, n1, generator=generator) * scale).to(dtype=dtype, device=device)
    b2 = (torch.randn(E, H, generator=generator) * scale).to(dtype=dtype, device=device)
    return w13, w2, b13, b2
