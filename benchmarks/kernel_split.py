"""Where one ``fused_experts`` / ``fused_moe`` call's GPU time goes, kernel by kernel:
``python -m benchmarks.kernel_split --out DIR [--shapes gpt-oss-20b] [--schemes mxfp4] [--tokens 1,16]``.

``benchmarks.run`` times whole calls; this splits them (docs/kernels.md asks why GPT-OSS-20B's 4-bit decode at
T = 1 takes as long as bf16's). Each cell: ``calls`` eager calls (launch plans replaying; weights rotated past L2
as ``benchmarks.run`` does) under ``torch.profiler`` with CUDA activity; per kernel name its launches and device
µs per call (mean over the calls); the sum of the kernels against the call's CUDA-graph time (one graph of a call on
each weight set, the time divided by the calls; the difference is the gaps between kernels), and that time once more
with an L2 flush that leaves clean lines (``graph_clean_us``: ``do_bench_ms(..., flush="read")``). Writes
``DIR/kernel_split.json``. ``--smoke``: a tiny shape on CPU, the CPU profile
of the reference path (exercises the code, measures nothing).

``--tiles "A=16x32x128x4x4/16x32x128x4x4 B=..."``: each cell also runs with these tiles (GEMM1/GEMM2, each
BMxBNxBKxWARPSxSTAGES) for its token bucket, through a tuned table of this GPU written for the variant
(``TORCH_MOE_OPS_TUNED_DIR``; plans cleared between variants): an A/B of tile choices in one process, each row
naming its ``tiles`` ("" = the package's own choice).

``--envs "ahead0=LOAD_AHEAD=0 ahead2=LOAD_AHEAD=2"``: each cell also runs, with the package's tiles, under each
set of the package's switches (without their ``TORCH_MOE_OPS_`` prefix; plans cleared between variants), in the
same process on the same weights; each row names its ``envs`` ("" = the environment as it was).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.run import do_bench_ms, make_weights
from benchmarks.shapes import SHAPES, MoEShape
from benchmarks.tiles import environment, parse_envs, tuned_dir, write_table

import torch_moe_ops as moe

TINY = MoEShape("Tiny", E=6, k=2, H=64, I=32)


def split(fn, calls: int, device: str) -> dict:
    """Per kernel (or op, on CPU) name: launches per call and device µs per call, from one profile of ``calls``
    calls of ``fn`` (warmed up first)."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync()
    by_name = defaultdict(list)  # name -> [(start, µs)] of every launch
    for evt in prof.events():
        if device == "cuda" and evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device != "cuda" and not evt.name.startswith("aten::"):
            continue
        by_name[evt.name].append((evt.time_range.start, evt.device_time if device == "cuda" else evt.cpu_time))
    rows = {}
    for name, evts in by_name.items():
        rows[name] = {"launches": len(evts) / calls, "us": sum(us for _, us in evts) / calls}
        per_call = len(evts) // calls
        if per_call > 1 and len(evts) == per_call * calls:  # the i-th launch of a call, e.g. GEMM1 and GEMM2
            evts.sort()
            rows[name]["per_launch_us"] = [sum(us for _, us in evts[i::per_call]) / calls for i in range(per_call)]
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["us"]))


def tile_tables(spec: str, shape: MoEShape, scheme: str, T: int, block, root: str,
                device_name: str | None = None) -> list[tuple[str, str]]:
    """(name, folder) per variant of ``--tiles``: each folder holds one tuned table of this GPU (``device_name``)
    giving GEMM1 and GEMM2 of ``shape`` their variant tiles at T's token bucket (``benchmarks.tiles``)."""
    from torch_moe_ops._kernels.configs import TileConfig, token_bucket
    from torch_moe_ops.schemes import get_quant_scheme

    key, bucket, out = get_quant_scheme(scheme).table_key(block), token_bucket(T), []
    for item in spec.split():
        name, _, tiles = item.partition("=")
        gemms = tiles.split("/")
        if len(gemms) != 2:
            raise ValueError(f"--tiles {item!r}: NAME=GEMM1/GEMM2, each BMxBNxBKxWARPSxSTAGES")
        folder = os.path.join(root, f"{shape.name}-{scheme}-T{T}-{name}")
        out.append((name, write_table(folder, device_name or torch.cuda.get_device_name(), shape, key, bucket,
                                      *map(TileConfig.parse, gemms))))
    return out


def cell(shape: MoEShape, scheme: str, T: int, op: str, calls: int, device: str, tiles: str = "",
         envs: str = "") -> list[dict]:
    """One row per variant: the package's own tiles first, then each of ``tiles`` (``--tiles``), then the package's
    tiles under each of ``envs`` (``--envs``)."""
    torch.manual_seed(T)
    data = make_weights(shape, scheme, device)
    q13, q2 = data.q13, data.q2
    kw = dict(data.quant, activation=shape.activation)
    if shape.bias:
        kw.update(w13_bias=data.b13, w2_bias=data.b2)
    x = (torch.randn(T, shape.H, device=device) * 0.1).to(torch.bfloat16)
    logits = torch.randn(T, shape.E, device=device)
    sets = [SimpleNamespace(q13=q13, q2=q2)]
    if device == "cuda":  # weights from HBM, as in a model: rotate copies past the 50 MB L2
        per_set = q13.numel() * q13.element_size() + q2.numel() * q2.element_size()
        sets += [SimpleNamespace(q13=q13.clone(), q2=q2.clone()) for _ in range(min(7, int(2e8 // per_set)))]
    w, ids = moe.topk_route(logits, shape.k, **shape.routing)
    turn = [0]

    def call():
        s = sets[turn[0] % len(sets)]
        turn[0] += 1
        if op == "fused_moe":
            return moe.fused_moe(x, logits, s.q13, s.q2, shape.k, **shape.routing, **kw)
        return moe.fused_experts(x, s.q13, s.q2, w, ids, **kw)

    from torch_moe_ops._kernels.configs import TUNED_DIR_ENV

    rows = []
    with tempfile.TemporaryDirectory() as root:
        variants = [("", "", tuned_dir(os.environ.get(TUNED_DIR_ENV)))]
        variants += [(name, "", tuned_dir(folder))
                     for name, folder in (tile_tables(tiles, shape, scheme, T, data.block, root) if tiles else [])]
        variants += [("", name, environment(values)) for name, values in parse_envs(envs)]
        for name, env_name, ctx in variants:
            try:
                with ctx:
                    row = _timed_row(shape, scheme, T, op, name, sets, call, calls, device)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile or fit: say so, go on
                row = dict(shape=shape.name, scheme=scheme, T=T, op=op, tiles=name, error=f"{type(exc).__name__}: "
                           f"{str(exc)[:200]}", kernels={}, kernels_us=float("nan"))
            row["envs"] = env_name
            rows.append(row)
    return rows


def _timed_row(shape, scheme, T, op, name, sets, call, calls, device) -> dict:
    row = dict(shape=shape.name, scheme=scheme, T=T, op=op, tiles=name, weight_sets=len(sets),
               kernels=split(call, calls, device))
    row["kernels_us"] = sum(k["us"] for k in row["kernels"].values())
    if device == "cuda":  # one graph replays a call on each weight set (run.py's way): the graph's launch and
        # do_bench's L2 flush (it leaves the L2 full of dirty lines) are shared by len(sets) calls, not paid by one
        row["graph_us"] = do_bench_ms(lambda: [call() for _ in sets], graph=True) * 1e3 / len(sets)
        # the same with an L2 flush that leaves clean lines (do_bench's leaves dirty ones to write back)
        row["graph_clean_us"] = do_bench_ms(lambda: [call() for _ in sets], graph=True, flush="read") * 1e3 / len(sets)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="gpt-oss-20b,qwen3-30b-a3b")
    p.add_argument("--schemes", default="none,int8_w8a16,int4_w4a16,mxfp4")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--ops", default="fused_moe")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU (the reference path)")
    p.add_argument("--tiles", default="", help='tile variants, e.g. "n32=16x32x128x4x4/16x32x128x4x4" (GPU)')
    p.add_argument("--envs", default="", help='switch variants, e.g. "ahead0=LOAD_AHEAD=0 pdl=PDL=1"')
    args = p.parse_args(argv)
    parse_envs(args.envs)  # a malformed spec fails before any cell
    device = "cpu" if args.smoke else "cuda"
    shapes = [TINY] if args.smoke else [SHAPES[s] for s in args.shapes.split(",")]
    rows = []
    for shape in shapes:
        for scheme in args.schemes.split(","):
            if not args.smoke and scheme not in shape.schemes:
                continue
            for T in map(int, args.tokens.split(",")):
                for op in args.ops.split(","):
                    for row in cell(shape, scheme, T, op, 2 if args.smoke else args.calls, device,
                                    "" if args.smoke else args.tiles, args.envs):
                        rows.append(row)
                        _print(row)
                    _write(args.out, device, rows)  # after every cell: a run cut by its time limit keeps them
    _write(args.out, device, rows)
    return 0


def _print(row: dict) -> None:
    top = ", ".join(f"{n[:40]} {k['us']:.1f}" + (" (" + " + ".join(f"{u:.1f}" for u in k["per_launch_us"]) + ")"
                                                  if len(k.get("per_launch_us", ())) in (2, 3, 4) else "")
                    for n, k in list(row["kernels"].items())[:6])
    tiles = f" tiles {row['tiles']}" if row.get("tiles") else ""
    tiles += f" envs {row['envs']}" if row.get("envs") else ""
    print(f"{row['shape']:<14} {row['scheme']:<11} T={row['T']:<5} {row['op']}{tiles}: kernels "
          f"{row['kernels_us']:.1f} us (graph {row.get('graph_us', float('nan')):.1f}, clean L2 "
          f"{row.get('graph_clean_us', float('nan')):.1f}); {top}{row.get('error', '')}", flush=True)


def _write(out: str, device: str, rows: list) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernel_split.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
