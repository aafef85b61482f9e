"""Training step timings (issue: prefill and training near the tensor-core limit; docs/training.md):
forward + backward of the routed experts, ``python -m benchmarks.train --out benchmarks/results/train.json``.

Providers, each timed as one ``fn()`` = forward, then backward of a fixed ``grad_out`` (grads set to None
between calls; ``triton.testing.do_bench``'s median on a GPU):

- ``ours``: ``fused_experts`` on trainable bf16 experts (x, w13, w2 and the router weights get gradients);
- ``ours_saved``: the same through the saving forward (GEMM1's output kept: ``FusedMoE(save_activations=True)``);
- ``ours_fp8_frozen``: frozen fp8_channel experts, gradients for x and the router weights only;
- ``grouped_mm``: the ``torch._grouped_mm`` autograd pipeline (argsort, gather, grouped GEMM, activation,
  grouped GEMM, weighted index_add), trainable like ``ours``.

TFLOP/s count 3 forward GEMM FLOPs for trainable experts (forward, dgrad, wgrad) and 2 for frozen ones."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from benchmarks.shapes import SHAPES

import torch_moe_ops as moe
from torch_moe_ops.ops.autograd import fused_experts_train
from torch_moe_ops.schemes import get_activation
from torch_moe_ops.testing import experts_kwargs, quantize_experts, random_moe_weights, time_per_call


def _bench_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return time_per_call(fn, 2, device) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=100, return_mode="median")


def _grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def providers(shape, w13, w2, x, w, ids) -> tuple[dict, list]:
    """({name: (forward, forward-FLOP multiple)}, the leaf tensors that get gradients) for one case; a provider
    is absent when this torch lacks it. The forwards return [T, H] in x's dtype."""
    act = shape.activation
    leaves = []

    def leaf(t):
        t = t.detach().clone().requires_grad_()
        leaves.append(t)
        return t

    x_, w_, w13_, w2_ = leaf(x), leaf(w), leaf(w13), leaf(w2)
    out = {"ours": (lambda: moe.fused_experts(x_, w13_, w2_, w_, ids, activation=act), 3),
           "ours_saved": (lambda: fused_experts_train(x_, w13_, w2_, w_, ids, activation=act)[0], 3)}
    q13, q2, s13, s2, block = quantize_experts(w13, w2, "fp8_channel", act)
    kw = experts_kwargs("fp8_channel", s13, s2, block)
    out["ours_fp8_frozen"] = (lambda: moe.fused_experts(x_, q13, q2, w_, ids, activation=act, **kw), 2)
    gmm = _grouped_mm()
    if gmm is not None:
        k, E = ids.shape[1], w13.shape[0]
        f = get_activation(act)

        def pipeline():
            flat = ids.flatten().long()
            order = torch.argsort(flat, stable=True)
            offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
            h = gmm(x_[order // k], w13_.transpose(-2, -1), offs=offs)
            y = gmm(f.apply(h.float(), f.alpha(None), f.limit(None)).to(h.dtype), w2_.transpose(-2, -1), offs=offs)
            y = y.float() * w_.flatten()[order, None]
            return torch.zeros(x_.shape, device=x_.device).index_add(0, order // k, y).to(x_.dtype)

        out["grouped_mm"] = (pipeline, 3)
    return out, leaves


def step(forward, leaves, grad_out):
    """forward + backward of ``grad_out``, the leaves' gradients cleared first."""
    def fn():
        for t in leaves:
            t.grad = None
        forward().backward(grad_out)
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--providers", default="ours,ours_saved,ours_fp8_frozen,grouped_mm")
    p.add_argument("--out", default="benchmarks/results/train.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dims", default="", help="E,k,H,I instead of each shape's (a small CPU run)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    cells = []
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        if args.dims:
            E, k, H, I = map(int, args.dims.split(","))
            shape = dataclasses.replace(shape, E=E, k=k, H=H, I=I)
        torch.manual_seed(0)
        w13, w2, _, _ = random_moe_weights(shape.E, shape.H, shape.I, dtype=torch.bfloat16, device=dev)
        for T in map(int, args.tokens.split(",")):
            x = (torch.randn(T, shape.H, device=dev) * 0.5).bfloat16()
            w, ids = moe.topk_route(torch.randn(T, shape.E, device=dev), shape.k)
            grad_out = torch.randn_like(x)
            fwd_flops = 2 * T * shape.k * (shape.n1 * shape.H + shape.H * shape.I)
            provs, leaves = providers(shape, w13, w2, x, w, ids)
            for name, (forward, mult) in provs.items():
                if name not in args.providers.split(","):
                    continue
                try:
                    ms = _bench_ms(step(forward, leaves, grad_out), dev)
                except Exception as exc:  # noqa: BLE001 - a failing provider is recorded, not fatal
                    cells.append(dict(shape=shape.name, T=T, provider=name, error=repr(exc)[:300]))
                    print(f"{shape.name} T={T} {name}: FAILED {exc!r}"[:300], flush=True)
                    continue
                tflops = mult * fwd_flops / ms / 1e9
                cells.append(dict(shape=shape.name, T=T, provider=name, ms=ms, tflops=tflops, flop_multiple=mult))
                print(f"{shape.name:<14} T={T:<6} {name:<16} {ms:9.3f} ms {tflops:7.1f} TFLOP/s", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    base = {(c["shape"], c["T"]): c["ms"] for c in cells if c.get("provider") == "grouped_mm" and "ms" in c}
    for c in cells:
        if "ms" in c and (c["shape"], c["T"]) in base:
            c["speedup_vs_grouped_mm"] = base[c["shape"], c["T"]] / c["ms"]
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M"),
                   "cells": cells}, f, indent=1)
    print(f"wrote {args.out}: {len(cells)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
