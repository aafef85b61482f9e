"""The main job: random Qwen3-MoE-shaped experts, ``torch.compile(fullgraph=True)`` over ``fused_moe`` in
bf16 and every quantized scheme (weights quantized by ``quantize_weight``), one table of accuracy and speed."""
from __future__ import annotations

import argparse
import time

import torch

from . import _platform, reference
from .ops import fused_moe, quantize_weight
from .testing import random_moe_weights, rel_error, sqnr_db

#: fused_experts scheme -> (weight scheme for quantize_weight, w13 shards)
SCHEMES = {
    "none": (None, 1),
    "fp8_tensor": ("fp8_tensor", 2),
    "fp8_channel": ("fp8_channel", 1),
    "fp8_block": ("fp8_block", 1),
    "int8_w8a16": ("int8_channel", 1),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=32, help="E (Qwen3-30B-A3B: 128)")
    p.add_argument("--top-k", type=int, default=8, help="k (Qwen3-30B-A3B: 8)")
    p.add_argument("--hidden", type=int, default=256, help="H (Qwen3-30B-A3B: 2048)")
    p.add_argument("--intermediate", type=int, default=96, help="I per expert (Qwen3-30B-A3B: 768)")
    p.add_argument("--tokens", type=int, default=64, help="T")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of " + ",".join(SCHEMES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10, help="timed calls per scheme")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4, help="layers of the pipeline checkpoint")
    p.add_argument("--quant", default="fp8_channel", help="online scheme for the pipeline: fp8_tensor, fp8_channel, "
                   "fp8_block, int8_w8a16 or none")
    p.add_argument("--skip-ops", action="store_true", help="only the load/quantize/reload pipeline")
    p.add_argument("--skip-pipeline", action="store_true", help="only the per-scheme op table")


def _time_per_call(fn, iters: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def run(args: argparse.Namespace) -> int:
    rc = 0 if args.skip_ops else run_ops(args)
    if not args.skip_pipeline:
        from .demo_pipeline import run_pipeline

        rc = rc or run_pipeline(args)
    return rc


def run_ops(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    E, k, H, I, T = args.experts, args.top_k, args.hidden, args.intermediate, args.tokens
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.bfloat16, device=device)
    x = (torch.randn(T, H) * 0.1).to(torch.bfloat16).to(device)
    logits = torch.randn(T, E, device=device)
    weights, ids = reference.topk_route(logits.cpu(), k)
    expected = reference.fused_experts(x.cpu().float(), w13.cpu().float(), w2.cpu().float(), weights, ids)

    compiled = torch.compile(fused_moe, fullgraph=True)
    print(f"fused_moe, E={E} k={k} H={H} I={I} T={T}, torch {torch.__version__}, "
          f"device {_platform.describe(device)}; reference: fp32 per-expert loop")
    header = f"{'scheme':<12} {'rel. error':>10} {'SQNR dB':>8} {'ms/call':>9}  weights"
    print(header + "\n" + "-" * len(header))
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        if scheme not in SCHEMES:
            raise SystemExit(f"--schemes: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        wscheme, shards = SCHEMES[scheme]
        kwargs = {}
        q13, q2 = w13, w2
        if wscheme is not None:
            q13, s13 = quantize_weight(w13, wscheme, shards=shards)
            q2, s2 = quantize_weight(w2, wscheme)
            kwargs = dict(quant_scheme=scheme, w13_scale=s13, w2_scale=s2)
        with torch.inference_mode():
            call = lambda: compiled(x, logits, q13, q2, k, **kwargs)  # noqa: E731
            out = call()
            ms = _time_per_call(call, args.iters, device) * 1e3
        err, sqnr = rel_error(expected, out.float().cpu()), sqnr_db(expected, out.float().cpu())
        print(f"{scheme:<12} {err:>10.2e} {sqnr:>8.1f} {ms:>9.3f}  {q13.dtype}".replace("torch.", ""))
    return 0
