"""The demo's op table: ``torch.compile(fused_moe, fullgraph=True)`` in every scheme of the registry, against
the fp32 reference on the unquantized weights (accuracy), with the weights' size and the time per call."""
from __future__ import annotations

import argparse

import torch

from .. import _platform, reference
from ..ops import fused_moe
from ..schemes import get_quant_scheme
from ..testing import experts_kwargs, quantize_experts, random_moe_weights, rel_error, sqnr_db, time_per_call


def parse_schemes(text: str) -> list:
    """``"none,int4_w4a16"`` -> the QuantScheme objects; an unknown name exits naming ``--schemes``."""
    out = []
    for name in (s.strip() for s in text.split(",")):
        if name:
            try:
                out.append(get_quant_scheme(name))
            except ValueError as exc:
                raise SystemExit(f"--schemes: {exc}") from None
    return out


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _storage(scheme, q13, block) -> str:
    """``int4_group uint8 x2, tile 1x32``: the format, its storage dtype and values per element, the tile."""
    if scheme.weight is None:
        return str(q13.dtype).replace("torch.", "")
    fmt = scheme.weight
    text = f"{fmt.name} {str(fmt.qdtype).replace('torch.', '')}"
    if fmt.pack > 1:
        text += f" x{fmt.pack}"
    return text + (f", tile {block[0]}x{block[1]}" if block is not None else "")


def run_ops(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    schemes = parse_schemes(args.schemes)
    torch.manual_seed(args.seed)
    E, k, H, I, T = args.experts, args.top_k, args.hidden, args.intermediate, args.tokens
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.bfloat16, device=device)
    x = (torch.randn(T, H) * 0.1).to(torch.bfloat16).to(device)
    logits = torch.randn(T, E, device=device)
    weights, ids = reference.topk_route(logits.cpu(), k)
    expected = reference.fused_experts(x.cpu().float(), w13.cpu().float(), w2.cpu().float(), weights, ids)

    compiled = torch.compile(fused_moe, fullgraph=True)
    print(f"fused_moe, E={E} k={k} H={H} I={I} T={T}, torch {torch.__version__}, "
          f"device {_platform.describe(device)}; reference: fp32 per-expert loop on the bf16 weights")
    header = f"{'scheme':<12} {'rel. error':>10} {'SQNR dB':>8} {'ms/call':>9} {'MiB':>6}  weights"
    print(header + "\n" + "-" * (len(header) + 24))
    for scheme in schemes:
        q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme, "silu")
        kwargs = experts_kwargs(scheme, s13, s2, block)
        with torch.inference_mode():
            call = lambda: compiled(x, logits, q13, q2, k, **kwargs)  # noqa: E731
            out = call()
            ms = time_per_call(call, args.iters, device) * 1e3
        got = out.float().cpu()
        mib = _nbytes(q13, q2, s13, s2) / 2**20
        print(f"{scheme.name:<12} {rel_error(expected, got):>10.2e} {sqnr_db(expected, got):>8.1f} {ms:>9.3f} "
              f"{mib:>6.2f}  {_storage(scheme, q13, block)}")
    return 0
