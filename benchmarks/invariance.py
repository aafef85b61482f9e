"""Batch invariance, measured (docs/batch-invariance.md): for every scheme, how many rows of a T = 4096 batch
change when the same tokens run at T = 1, 7, 64 and 1000 (alone and among other tokens), in the default mode
and in batch-invariant mode. ``python -m benchmarks.invariance --out invariance.json`` on a GPU; the table it
prints goes into docs/batch-invariance.md."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from benchmarks.shapes import SHAPES

import torch_moe_ops as moe
from torch_moe_ops.testing import batch_variance, experts_kwargs, quantize_experts, random_moe_weights


def table(rows: list[dict]) -> str:
    """The markdown table of docs/batch-invariance.md: rows differing / compared per scheme, mode and size."""
    sizes = list(rows[0]["differing"]) if rows else []
    head = (f"| scheme | mode | " + " | ".join(f"T={n}" for n in sizes) + " |\n|---|---|" + "---|" * len(sizes))
    body = [f"| {r['scheme']} | {'invariant' if r['invariant'] else 'default'} | "
            + " | ".join(f"{r['differing'][n]}/{r['compared'][n]}" for n in sizes) + " |" for r in rows]
    return "\n".join([head, *body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--schemes", default="", help="comma list (default: the shape's)")
    p.add_argument("--T", type=int, default=4096, help="the whole batch")
    p.add_argument("--sizes", default="1,7,64,1000")
    p.add_argument("--out", default="benchmarks/results/invariance.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dims", default="", help="E,k,H,I instead of the shape's (a small CPU run)")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.dims:
        E, k, H, I = map(int, args.dims.split(","))
        shape = dataclasses.replace(shape, E=E, k=k, H=H, I=I)
    dev = torch.device(args.device)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    w13, w2, b13, b2 = random_moe_weights(shape.E, shape.H, shape.I, dtype=torch.bfloat16, device=dev,
                                          bias=shape.bias, gated=True)
    x = (torch.randn(args.T, shape.H, device=dev) * 0.5).bfloat16()
    logits = torch.randn(args.T, shape.E, device=dev)
    rows = []
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}: {shape.name}, rows differing from the T={args.T} batch "
          f"(alone + among others; sizes {sizes})")
    for scheme in (args.schemes.split(",") if args.schemes else shape.schemes):
        q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme, shape.activation)
        kw = dict(activation=shape.activation, **experts_kwargs(scheme, s13, s2, block), **shape.routing)
        if b13 is not None:
            kw.update(w13_bias=b13, w2_bias=b2)
        for mode in (False, True):
            t0 = time.perf_counter()
            got = batch_variance(lambda x, lg: moe.fused_moe(x, lg, q13, q2, shape.k, batch_invariant=mode, **kw),
                                 (x, logits), sizes=sizes, trials=1)
            row = dict(device=name, shape=shape.name, scheme=scheme, invariant=mode,
                       T=args.T, differing={n: got[n][0] for n in sizes}, compared={n: got[n][1] for n in sizes})
            rows.append(row)
            cells = "  ".join(f"T={n}: {got[n][0]}/{got[n][1]}" for n in sizes)
            print(f"{scheme:<11} {'invariant' if mode else 'default':<9} {cells}  ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        del q13, q2, s13, s2
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
