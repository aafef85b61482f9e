"""Turn a runner JSON into the tables of ``docs/performance.md`` and ``docs/performance.png`` (speed-up over
each peer and fraction of roofline, per model; ``benchmarks/plot.py``):
``python -m benchmarks.report benchmarks/results/<run>.json``."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from . import plot as _plot


def _fmt(ms):
    return f"{ms:.3f}" if ms is not None else "—"


def _ratio(cell, base) -> str:
    """``cell``'s time over ``base``'s (e.g. 1.03x: 3 % slower), or a dash."""
    if not cell or not base or not cell.get("ms") or not base.get("ms"):
        return "—"
    return f"{cell['ms'] / base['ms']:.3f}x"


def tables(result: dict) -> str:
    cells = [c for c in result["cells"] if "T" in c]
    providers = sorted({c["provider"] for c in cells}, key=lambda p: (not p.startswith("ours"), p))
    by_key = defaultdict(dict)
    for c in cells:
        by_key[(c["shape"], c["scheme"], c["T"])][c["provider"]] = c
    inv = "ours_invariant" in providers  # batch-invariant mode timed too: its cost per cell
    extra = [(p, title) for p, title in (("ours_swapped", "swapped / ours"),  # docs/kernels.md
                                         ("ours_invariant_swapped", "invariant swapped / ours")) if p in providers]
    lines = ["| shape | scheme | T | roof ms | " + " | ".join(f"{p} ms" for p in providers)
             + " | ours % of roof | ours TFLOP/s | ours vs grouped_mm | ours vs ours bf16 |"
             + (" invariant / ours |" if inv else "") + "".join(f" {title} |" for _, title in extra),
             "|---|---|---|---|" + "---|" * len(providers) + "---|---|---|---|" + ("---|" if inv else "")
             + "---|" * len(extra)]
    for (shape, scheme, T), row in by_key.items():
        ours = row.get("ours", {})
        roof = next((c["roof_s"] * 1e3 for c in row.values() if "roof_s" in c), None)
        cols = [_fmt(row[p].get("ms")) if p in row else "—" for p in providers]
        vs = ours.get("speedup_vs_grouped_mm") or ours.get("speedup_vs_scaled_grouped_mm")
        bf16 = by_key.get((shape, "none", T), {}).get("ours", {}).get("ms")  # a quantized scheme's gain
        vs_bf16 = bf16 / ours["ms"] if bf16 and ours.get("ms") and scheme != "none" else None
        lines.append(f"| {shape} | {scheme} | {T} | {_fmt(roof)} | " + " | ".join(cols)
                     + f" | {ours.get('frac_roof', 0) * 100:.0f}% | {ours.get('tflops', 0):.0f} | "
                     + (f"{vs:.2f}x" if vs else "—") + " | " + (f"{vs_bf16:.2f}x" if vs_bf16 else "—") + " |"
                     + (f" {_ratio(row.get('ours_invariant'), ours)} |" if inv else "")
                     + "".join(f" {_ratio(row.get(p), ours)} |" for p, _ in extra))
    quant = [c for c in result["cells"] if c.get("kind") == "quantize"]
    if quant:
        lines += ["", "Online quantization of ~1 G-element bf16 w13 tensors `[E, 2I, H]` (`quantize_weight_into`; "
                  "GB/s counts 2 B read + the storage bytes written per element: 1 B, int4 0.5 B):", "",
                  "| tensor | scheme | ms | GB/s | % of copy bandwidth |", "|---|---|---|---|---|"]
        lines += [f"| {c.get('shape', 'w')} `{c.get('dims', [8, 32768, 4096])}` | {c['scheme']} | {c['ms']:.3f} | "
                  f"{c['GBps']:.0f} | {c['frac_copy'] * 100:.0f}% |" for c in quant]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--md", default="benchmarks/results/tables.md", help="the tables (paste into docs/performance.md)")
    p.add_argument("--png", default="docs/performance.png", help="the figure ('' to skip it)")
    p.add_argument("--peers", default="auto", help="the JSON of the speed-up row; 'auto': the results JSON if it "
                   "has peer cells, else the newest JSON with peers under --peers-dir")
    p.add_argument("--peers-dir", default=_plot.RESULTS_DIR)
    args = p.parse_args(argv)
    with open(args.results) as f:
        result = json.load(f)
    c = result["ceilings"]
    head = (f"Device: {result['device']}, torch {result['torch']}, measured {result['time']}. Ceilings measured in "
            f"the same run: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_TFLOPs']:.0f} TFLOP/s, fp8 "
            f"{c.get('fp8_TFLOPs', 0):.0f} TFLOP/s. Command: `{result['command']}`.\n\n")
    with open(args.md, "w") as f:
        f.write(head + tables(result) + "\n")
    print(f"wrote {args.md}")
    if args.png:
        peers = _plot.plot(result, args.png, _plot.source_label(args.results, result), peers=args.peers,
                           peers_dir=args.peers_dir)
        print(f"wrote {args.png} (speed-ups from {peers})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
