"""One runner for every provider and shape: ``python -m benchmarks.run --out results.json``.

Measures the device's copy bandwidth and bf16/fp8 matmul peaks in the same run, times every
(shape, scheme, T, provider) cell with ``triton.testing.do_bench`` (median; CUDA-graph replay for graph
providers), and writes JSON with the roofline, the fraction of roofline and the ratio to each peer. A cell
whose touched weights are under ``shapes.L2_DEFEAT_BYTES`` runs n calls on n copies of the weights per timed call
(``weight_copies`` in the JSON) and reports a call's share, so that weights come from HBM as in a model."""
from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

import torch

from benchmarks.providers import REGISTRY
from benchmarks.shapes import QUANT_SHAPES, SHAPES, TOKENS, roofline_s, weight_copies

import torch_moe_ops as moe
from torch_moe_ops.schemes import WEIGHT_FORMATS, get_quant_scheme
from torch_moe_ops.testing import experts_kwargs, quantize_experts, random_moe_weights


def do_bench_ms(fn, graph: bool, rep_ms: int = 200, flush: str = "write") -> float:
    """Median ms of ``fn`` (``graph``: captured once, then replayed), the L2 flushed before each run. ``flush``:
    "write" is triton's ``do_bench`` (it zeroes 256 MB, which leaves the L2 full of dirty lines that the timed
    kernels must write back as they load); "read" reads 256 MB instead (``_timed_read_flush``): clean lines, as
    in a model, where the step before leaves little dirty data (docs/kernels.md, "Two launches at T = 1")."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    target = fn
    if graph:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm-up on a side stream before capture (allocator, Triton JIT)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        target = g.replay
    if flush == "read":
        return _timed_read_flush(target, rep_ms)
    return do_bench(target, warmup=25, rep=rep_ms, return_mode="median")


def _timed_read_flush(fn, rep_ms: int) -> float:
    """``do_bench``'s loop (warm-up, then each run timed by its own events after an L2 flush), the flush a read of
    256 MB into one value: the L2 is left holding clean lines of that buffer."""
    buf = torch.ones(64 << 20, dtype=torch.float32, device="cuda")  # 256 MB
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        torch.sum(buf, 0, out=sink)
        fn()
    end.record()
    torch.cuda.synchronize()
    n = max(10, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3)))
    for _ in range(max(1, n // 8)):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        torch.sum(buf, 0, out=sink)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)]).median())


def measure_ceilings() -> dict:
    from triton.testing import do_bench

    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ a, return_mode="median")
    out = {"copy_GBps": 2 * n / copy_ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), a.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        f8_ms = do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), return_mode="median")
        out["fp8_TFLOPs"] = 2 * 8192**3 / f8_ms / 1e9
    except Exception as exc:  # noqa: BLE001 - report, keep going
        out["fp8_error"] = repr(exc)
    del src, dst, a
    torch.cuda.empty_cache()
    return out


def bench_quantize(ceilings: dict) -> list:
    """Online quantization of ~1 G-element bf16 w13 tensors (``QUANT_SHAPES``) in every weight format of the
    registry (per-tensor: gate/up shards); GB/s counts 2 B read plus the storage bytes written per element."""
    rows = []
    for name, shape in QUANT_SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for scheme, fmt in WEIGHT_FORMATS.items():
            shards = 2 if fmt.sharded else 1
            q, s = moe.quantize_weight(w, scheme, shards=shards)
            ms = do_bench_ms(lambda: moe.quantize_weight_into(w, q, s, scheme, shards=shards), graph=False)
            gbps = w.numel() * (2 + fmt.qdtype.itemsize / fmt.pack) / ms / 1e6
            rows.append(dict(kind="quantize", shape=name, dims=list(shape), scheme=scheme, numel=w.numel(), ms=ms,
                             GBps=gbps, frac_copy=gbps / ceilings["copy_GBps"]))
            print(f"quantize {name:<13} {scheme:<12} {ms:8.3f} ms {gbps:7.0f} GB/s "
                  f"({100 * gbps / ceilings['copy_GBps']:.1f}% of copy)", flush=True)
            del q, s
        del w
        torch.cuda.empty_cache()
    return rows


#: At most this much memory goes to weight copies (the largest full weight sets are DeepSeek-V3's, ~11-23 GB).
COPIES_MAX_BYTES = 24e9


def l2_copies(touched_bytes: float, data, rotations: list) -> int:
    """How many weight sets a cell rotates through (``shapes.weight_copies``, within ``COPIES_MAX_BYTES``).
    Clones what ``rotations`` lacks: each entry is a namespace of the data's tensors (weights, scales, biases)
    and its ``quant`` keywords, overriding the case's."""
    tensors = {k: v for k, v in vars(data).items() if isinstance(v, torch.Tensor)}
    copies = weight_copies(touched_bytes, sum(t.numel() * t.element_size() for t in tensors.values()),
                           COPIES_MAX_BYTES)
    while len(rotations) < copies - 1:
        r = SimpleNamespace(**{k: v.clone() for k, v in tensors.items()})
        r.quant = experts_kwargs(data.qscheme.name, r.s13 if data.s13 is not None else None,
                                 r.s2 if data.s2 is not None else None, data.block)  # the copies' scales
        rotations.append(r)
    return copies


def make_weights(shape, scheme, device="cuda"):
    """bf16 weights and, for a quantized scheme, the registry's quantization of them (``case.quant``: the
    ``fused_experts`` keywords; ``case.block``: the scale tile, int4's group fitted to H and I)."""
    w13, w2, b13, b2 = random_moe_weights(shape.E, shape.H, shape.I, gated=shape.n1 == 2 * shape.I,
                                          device=device, bias=shape.bias)
    q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme, shape.activation)
    data = SimpleNamespace(w13=w13, w2=w2, b13=b13, b2=b2, q13=q13, q2=q2, s13=s13, s2=s2, block=block,
                           quant=experts_kwargs(scheme, s13, s2, block), qscheme=get_quant_scheme(scheme))
    if data.qscheme.quantized and shape.E * shape.n1 * shape.H > 2e9:
        data.w13 = data.w2 = None  # the bf16 copies are not needed by quantized-only providers
    return data


def _write(path: str, ceilings: dict, cells: list) -> None:
    """Ratios to each peer in the same (shape, scheme, T), then the JSON (rewritten after every block, so a
    run cut short still leaves its cells)."""
    for cell in cells:  # ratios to each peer in the same (shape, scheme, T)
        if cell.get("provider") not in ("ours", "ours_fused_moe") or "ms" not in cell:
            continue
        for other in cells:
            if (other.get("shape"), other.get("scheme"), other.get("T")) == (cell["shape"], cell["scheme"], cell["T"]) \
                    and not other.get("provider", "ours").startswith("ours") and "ms" in other:
                cell[f"speedup_vs_{other['provider']}"] = other["ms"] / cell["ms"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings,
              "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cells": cells}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--providers", default=",".join(REGISTRY))
    p.add_argument("--schemes", default="", help="restrict schemes (default: each shape's own)")
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--no-quant", action="store_true", help="skip the online-quantization bandwidth benchmark")
    p.add_argument("--flush", choices=("write", "read"), default="write",
                   help="the L2 flush before each timed run: do_bench's zeroing (write, the default: every figure "
                        "before session 14) or a read that leaves clean lines (read: as in a model's decode "
                        "step; docs/kernels.md)")
    args = p.parse_args(argv)
    ceilings = measure_ceilings()
    print(json.dumps(ceilings), flush=True)
    cells = [] if args.no_quant else bench_quantize(ceilings)
    for key in [s for s in args.shapes.split(",") if s]:
        shape = SHAPES[key]
        for scheme in shape.schemes:
            if args.schemes and scheme not in args.schemes.split(","):
                continue
            data = make_weights(shape, scheme)
            rotations = []  # weight copies cloned on demand (l2_copies), shared by the scheme's T values
            # fp8 x fp8 dots run at the fp8 peak; weight-only schemes (int8, int4) and bf16 at the bf16 one
            peak = ceilings["bf16_TFLOPs"]
            if data.qscheme.fp8_dot:
                peak = ceilings.get("fp8_TFLOPs", peak)
            for T in map(int, args.tokens.split(",")):
                torch.manual_seed(T)
                x = (torch.randn(T, shape.H, device="cuda") * 0.1).to(torch.bfloat16)
                logits = torch.randn(T, shape.E, device="cuda")
                bias = torch.randn(shape.E, device="cuda") * 0.1 if shape.routing else None
                w, ids = moe.topk_route(logits, shape.k, **shape.routing, e_score_correction_bias=bias)
                case = SimpleNamespace(shape=shape, scheme=scheme, x=x, router_logits=logits, topk_weights=w,
                                       topk_ids=ids, bias13=bias, **vars(data))
                touched = int(torch.unique(ids).numel())
                roof = roofline_s(shape, T, scheme, touched, ceilings["copy_GBps"] * 1e9, peak * 1e12, data.block)
                wbytes = roof["bytes"] - 2 * T * shape.H * 2
                copies = l2_copies(wbytes, data, rotations)
                cases = [case] + [SimpleNamespace(**{**vars(case), **vars(r)}) for r in rotations[:copies - 1]]
                for name in args.providers.split(","):
                    prov = REGISTRY[name]
                    fns = [prov.build(c) for c in cases]
                    if fns[0] is None:
                        continue
                    try:
                        ms = do_bench_ms(lambda: [f() for f in fns], prov.graph, flush=args.flush) / len(fns)
                    except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
                        print(f"{shape.name} {scheme} T={T} {name}: FAILED {exc!r}"[:300], flush=True)
                        cells.append(dict(shape=shape.name, scheme=scheme, T=T, provider=name, error=repr(exc)[:300]))
                        continue
                    cell = dict(shape=shape.name, scheme=scheme, T=T, provider=name, ms=ms, **roof,
                                frac_roof=roof["roof_s"] * 1e3 / ms, tflops=roof["flops"] / ms / 1e9,
                                experts_touched=touched, weight_copies=len(fns), flush=args.flush)
                    cells.append(cell)
                    print(f"{shape.name:<14} {scheme:<11} T={T:<6} {name:<18} {ms:9.4f} ms "
                          f"roof {roof['roof_s'] * 1e3:8.4f} ms ({cell['frac_roof'] * 100:5.1f}%) "
                          f"{cell['tflops']:7.1f} TFLOP/s", flush=True)
                torch.cuda.empty_cache()
            del data, rotations
            torch.cuda.empty_cache()
            _write(args.out, ceilings, cells)
    _write(args.out, ceilings, cells)
    print(f"wrote {args.out}: {len(cells)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
