"""Tune the grouped MoE GEMM's tiles on this GPU and write the table ``_kernels/configs.py`` reads.

For each token count T, every candidate TileConfig is timed replayed in a CUDA graph (``do_bench`` median, on
random uniform routing, weights far larger than L2 for real models) and the fastest is kept. ``--model``
tunes both GEMMs of a layer: GEMM1 ``[E, N1, H]`` first, then GEMM2 ``[E, H, I]`` restricted to the
BLOCK_M GEMM1 picked (both GEMMs share one alignment, so ``fused_experts`` forces GEMM1's BLOCK_M).

Examples (GPU only)::

    python benchmarks/tune.py --model mixtral --T 1 16 64 256 1024 4096 16384
    python benchmarks/tune.py --E 8 --N 28672 --K 4096 --top-k 2 --scheme fp8_channel --T 64 1024
    python benchmarks/tune.py --model deepseek-v3 --scheme fp8_block --space quick --T 64 1024
    python benchmarks/tune.py --model qwen3-30b-a3b --scheme int4_w4a16 --block-shape 1 128 --T 1 16 256
    python benchmarks/tune.py --model all --scheme all     # a new GPU: every preset layer and scheme

With ``--model``, T = 1 is tuned on the call that runs (``tune_t1``: ``fused_moe`` of one token, pair rows and the
fused activation and sum, through ``benchmarks.tiles``); ``--aligned-t1`` tunes it GEMM by GEMM like the other T.

The roof column's ceilings (copy bandwidth, bf16 matmul) and the shared-memory limit are the GPU's own,
measured or read at the start. Weights are copied until one timed call touches 200 MB of them, so that
decode tiles are chosen for weights streamed from HBM. The file records the GPU's compute capability:
a GPU of the same family without a table of its own uses it (``_kernels/configs.py``).

The output (default ``torch_moe_ops/_kernels/tuned/<device>.json``) is merged into: entries of other
shapes and token counts are kept; timings are stored next to the configs for the record.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_moe_ops.schemes import QUANT_SCHEMES, QuantScheme, get_quant_scheme  # noqa: E402
from torch_moe_ops._kernels.configs import TUNED_DIR, TileConfig, default_config, fits_scale_tile  # noqa: E402
from torch_moe_ops.testing import fitting_block  # noqa: E402

from benchmarks.shapes import weight_copies  # noqa: E402

#: (E, top_k, H, I per partition) of common MoE layers.
MODELS = {
    "mixtral": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "gpt-oss-20b": (32, 4, 2880, 2880),
    "deepseek-v3": (256, 8, 7168, 2048),
}
SMEM_BYTES = 227 * 1024  # H100 / H200 per-block shared memory limit (the GPU's own is read when there is one)
#: Memory for the weight copies that defeat L2 (``benchmarks.shapes.weight_copies``): decode tiles are chosen
#: for weights streamed from HBM, as in a model.
COPIES_MAX_BYTES = 8e9


def candidates(T: int, top_k: int, E: int, N: int, K: int, scheme: QuantScheme, block, space: str, block_m=None,
               smem: int = SMEM_BYTES):
    """Tile candidates worth timing for T tokens (pruned by rows per expert, ``smem`` bytes of shared memory
    and K; a tiled scheme's BLOCK_K must divide its scale tile's K, or for [1, G] groups may be a multiple of
    G). K is the logical reduction size."""
    rows_per_expert = max(1, T * top_k // E)
    if block_m is None:  # the three largest BLOCK_M that one expert's rows can still fill halfway
        bms = [b for b in (16, 32, 64, 128) if b <= max(16, 2 * rows_per_expert)][-3:]
    else:
        bms = [block_m]
    quick = space == "quick"
    fp8 = scheme.fp8_dot
    few_rows = T * top_k <= 64  # decode: more, narrower column tiles keep every SM streaming weights
    bns = ((32, 64, 128) if few_rows else (64, 128, 256)) if quick else (32, 64, 128, 256)
    if scheme.packed and few_rows:  # 4-bit decode: a 16 x 128 tile left GPT-OSS-20B with 92-180 programs a GEMM
        bns = (16, 32, 64, 128)  # at T = 1 (H100 2026-12-07: int4 as slow as bf16 there), so narrower ones too
    bks = (128,) if fp8 else ((64, 128) if quick else (32, 64, 128, 256))
    if scheme.flags.BLOCK_SCALES:
        bks = tuple(b for b in (64, 128) if fits_scale_tile(b, scheme, block))
    elif scheme.tiled:  # weight-only groups: BLOCK_K divides the group, or spans several (scaled before the dot)
        bks = tuple(b for b in (32, 64, 128, 256) if fits_scale_tile(b, scheme, block)
                    and (b < 256 or (scheme.packed and few_rows)))  # (256: half the K steps of a decode loop)
        if scheme.packed:
            bks = tuple(b for b in bks if b >= 64)  # two dots of BLOCK_K / 2 >= 32 each: 32 wastes the MMA
    warps = (4, 8)
    stages = (3, 4) if quick else (2, 3, 4, 5)
    a_bytes = 1 if fp8 else 2
    b_bytes = 2 if not scheme.quantized else scheme.weight.qdtype.itemsize / scheme.weight.pack
    out = []
    for bm, bn, bk, nw, ns in itertools.product(bms, bns, bks, warps, stages):
        if bk > max(32, 2 * K) or bn > max(32, 2 * N):
            continue
        if (bm * bk * a_bytes + bk * bn * b_bytes) * ns > smem:
            continue
        # GROUP_M only matters once an expert spans several row blocks; 16 covers every real case
        gm = 16 if rows_per_expert > bm else 1
        if nw == 8 and bm * bn < 64 * 128:
            continue
        out.append(TileConfig(bm, bn, bk, gm, nw, ns))
    default = default_config(T, E, N, K, scheme, block, top_k=top_k)
    if block_m is not None:
        default = TileConfig(block_m, default.block_n, default.block_k, default.group_m, default.num_warps,
                             default.num_stages)
    if default not in out:
        out.append(default)
    return out, default


class GemmProblem:
    """Random inputs of one grouped GEMM (weights [E, N, K] quantized per ``scheme``) for T tokens."""

    def __init__(self, T, E, N, K, top_k, a_div, scheme: QuantScheme, block, dtype=torch.bfloat16, seed=0):
        from torch_moe_ops.reference.quant import quantize_weight

        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.T, self.E, self.N, self.K, self.top_k, self.a_div = T, E, N, K, top_k, a_div
        self.scheme, self.block = scheme, block
        rows = T if a_div == top_k else T * top_k
        self.w_scale = None
        if not scheme.quantized:
            self.w = torch.randn(E, N, K, device="cuda", dtype=dtype, generator=gen) / 10
        else:  # quantize expert by expert: an fp32 copy of a DeepSeek-size layer would not fit
            shards = 2 if scheme.weight.sharded and a_div > 1 else 1
            parts = [quantize_weight(torch.randn(1, N, K, device="cuda", dtype=dtype, generator=gen) / 10,
                                     scheme.weight, block, shards) for _ in range(E)]
            self.w = torch.cat([q for q, _ in parts])
            self.w_scale = scheme.canonical_scale(torch.cat([s for _, s in parts]))
        a = torch.randn(rows, K, device="cuda", dtype=dtype, generator=gen) / 10
        self.a_scale = None
        if scheme.act is not None:
            from torch_moe_ops._kernels.activation import quantize_activation

            a, self.a_scale = quantize_activation(a, scheme.act, scheme.act_group(block))
        self.a = a
        logits = torch.randn(T, E, device="cuda", generator=gen)
        self.topk_weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        self.topk_ids = ids.to(torch.int32)
        self.c = torch.empty(T * top_k, N, device="cuda", dtype=dtype)
        self._align = {}
        n = weight_copies(self.touched_weight_bytes(), self.w.numel() * self.w.element_size(), COPIES_MAX_BYTES)
        self.weights = [(self.w, self.w_scale)] + [
            (self.w.clone(), self.w_scale.clone() if self.w_scale is not None else None) for _ in range(n - 1)]

    def touched_weight_bytes(self) -> float:
        """Expected stored bytes of the experts T tokens touch under uniform routing (int4: K / 2 per row)."""
        touched = self.E * (1 - (1 - 1 / self.E) ** (self.T * self.top_k))
        return touched * self.w[0].numel() * self.w.element_size()

    def align(self, block_m):
        if block_m not in self._align:
            from torch_moe_ops._kernels.align import align_block_size

            self._align[block_m] = align_block_size(self.topk_ids, self.E, block_m, None)
        return self._align[block_m]

    def run(self, cfg: TileConfig):
        """One GEMM on each weight copy in turn (``bench`` divides by ``len(self.weights)``)."""
        from torch_moe_ops._kernels.gemm import invoke_moe_gemm

        align = self.align(cfg.block_m)
        for w, w_scale in self.weights:
            invoke_moe_gemm(
                self.a, w, self.c, *align, top_k=self.a_div, config=cfg, scheme=self.scheme,
                a_scale=self.a_scale, w_scale=w_scale, block=self.block,
                topk_weights=self.topk_weights if self.a_div == 1 else None,
            )

    def roofline_us(self, peak_tflops, bandwidth_gbs):
        """max(bytes of touched experts / bandwidth, flops / peak) in µs, for the fraction of roof."""
        w_bytes = self.touched_weight_bytes()
        io_bytes = self.a.numel() * self.a.element_size() + self.c.numel() * self.c.element_size()
        flops = 2 * self.T * self.top_k * self.N * self.K
        return max((w_bytes + io_bytes) / (bandwidth_gbs * 1e3), flops / (peak_tflops * 1e6))


def bench(fn) -> float:
    """µs of ``fn`` replayed as a CUDA graph (as ``benchmarks.run`` times the op): decode GEMMs launched one by
    one time the host's launches too (H100, 2026-12-07, GPT-OSS-20B int4 T = 1 with the heuristic's tiles: 218 µs
    for the two GEMMs that way, 74 µs replayed in a graph)."""
    from benchmarks.run import do_bench_ms

    return do_bench_ms(fn, graph=True, rep_ms=100) * 1e3


def tune_gemm(problem: GemmProblem, cands, default, verbose=False):
    """Time every candidate (µs per GEMM: a timed call runs one per weight copy); returns (best config, best
    µs, default µs)."""
    best, best_us = None, float("inf")
    default_us = None
    for cfg in cands:
        try:
            us = bench(lambda: problem.run(cfg)) / len(problem.weights)
        except Exception as exc:  # out of resources for this tile: skip it
            if verbose:
                print(f"    skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if cfg == default:
            default_us = us
        if us < best_us:
            best, best_us = cfg, us
        if verbose:
            print(f"    {us:9.1f} us  {cfg}")
    if best is not None and best != default and not agrees(problem, best, default):
        print(f"    {best} disagrees with the default tiles' output: not kept")
        return default, default_us if default_us is not None else float("inf"), default_us
    return best, best_us, default_us


def agrees(problem: "GemmProblem", cfg, default) -> bool:
    """The chosen tiles compute what the default ones do (fp32 accumulation in another order: within 1 % of
    the output's norm), so that a tile that miscomputes (an untested mask or decode path) is never kept."""
    outs = []
    for c in (default, cfg):
        problem.c.fill_(float("nan"))  # rows no pair writes stay NaN in both
        problem.run(c)
        outs.append(problem.c.float().clone())
    want, got = outs
    mask = torch.isfinite(want)
    return bool(torch.equal(mask, torch.isfinite(got))
                and (got[mask] - want[mask]).norm() <= 0.01 * want[mask].norm() + 1e-6)


def merge_into(path: Path, device: str, E: int, N: int, K: int, skey: str, results: dict, capability=None):
    data = json.loads(path.read_text()) if path.exists() else {"device": device, "entries": []}
    import triton

    data["device"], data["triton"], data["torch"] = device, triton.__version__, torch.__version__
    if capability is not None:  # GPUs of this family without a table of their own use this one
        data["capability"] = list(capability)
    data["written_by"] = "benchmarks/tune.py (CUDA-graph do_bench median, uniform random routing, bf16 activations)"
    entry = next((e for e in data["entries"] if (e["E"], e["N"], e["K"], e["scheme"]) == (E, N, K, skey)), None)
    if entry is None:
        entry = {"E": E, "N": N, "K": K, "scheme": skey, "configs": {}, "us": {}}
        data["entries"].append(entry)
    for T, (cfg, us) in results.items():
        entry["configs"][str(T)] = cfg.to_dict()
        entry.setdefault("us", {})[str(T)] = round(us, 2)
    entry["configs"] = dict(sorted(entry["configs"].items(), key=lambda kv: int(kv[0])))
    entry["us"] = dict(sorted(entry["us"].items(), key=lambda kv: int(kv[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(data))


def _dumps(data: dict) -> str:
    """JSON with one line per tuned T (diff-friendly, short)."""
    head = {k: v for k, v in data.items() if k != "entries"}
    lines = ["{", *(f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()), ' "entries": [']
    for i, e in enumerate(data["entries"]):
        lines.append(f'  {{"E": {e["E"]}, "N": {e["N"]}, "K": {e["K"]}, "scheme": {json.dumps(e["scheme"])},')
        lines.append('   "configs": {')
        cfgs = list(e["configs"].items())
        for n, (t, c) in enumerate(cfgs):
            lines.append(f"    {json.dumps(t)}: {json.dumps(c)}" + ("," if n < len(cfgs) - 1 else ""))
        lines.append(f'   }}, "us": {json.dumps(e.get("us", {}))}}}' + ("," if i < len(data["entries"]) - 1 else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS) + ["all"],
                   help="tune both GEMMs of this layer (E, k, H, I preset); all: every preset")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: I per partition = I / tp")
    p.add_argument("--E", type=int, help="local experts (single-GEMM mode)")
    p.add_argument("--N", type=int, help="GEMM output width (single-GEMM mode)")
    p.add_argument("--K", type=int, help="GEMM reduction size (single-GEMM mode)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--gemm2", action="store_true", help="single-GEMM mode: A rows are pairs (top_k = 1 addressing)")
    p.add_argument("--scheme", default="none", choices=sorted(QUANT_SCHEMES) + ["all"],
                   help="all: every scheme of the registry with its default scale tile")
    p.add_argument("--block-shape", type=int, nargs=2, default=None,
                   help="scale tile of a tiled scheme (fp8_block: bn bk, default 128 128; int4_w4a16: 1 G, "
                        "default 1 128)")
    p.add_argument("--T", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--space", choices=("quick", "full"), default="quick")
    p.add_argument("--out", type=Path, help="JSON file to merge into (default: tuned/<device>.json)")
    p.add_argument("--peak-tflops", type=float, help="bf16 matmul ceiling for the roof column (default: measured)")
    p.add_argument("--bandwidth", type=float, help="copy bandwidth GB/s for the roof column (default: measured)")
    p.add_argument("--dry-run", action="store_true", help="print, do not write the table")
    p.add_argument("--aligned-t1", action="store_true",
                   help="--model at T = 1: tune each GEMM alone on aligned rows, not the real fused_moe call")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    schemes = [get_quant_scheme(n) for n in (QUANT_SCHEMES if args.scheme == "all" else [args.scheme])]
    if args.scheme == "all" and args.block_shape is not None:
        p.error("--scheme all tunes each scheme's default tile: give one scheme with --block-shape")
    try:
        blocks = [sc.block_shape(args.block_shape, "--block-shape") for sc in schemes]
    except ValueError as exc:
        p.error(str(exc))
    if not torch.cuda.is_available():
        p.error("tuning needs a CUDA GPU")
    if args.model:
        layers = []
        for m in sorted(MODELS) if args.model == "all" else [args.model]:
            E, k, H, I = MODELS[m]
            I //= args.tp
            layers.append((m, [("gemm1", E, 2 * I, H, k, k), ("gemm2", E, H, I, k, 1)]))
    else:
        if None in (args.E, args.N, args.K):
            p.error("give --model, or --E, --N and --K")
        layers = [(None, [("gemm", args.E, args.N, args.K, args.top_k, 1 if args.gemm2 else args.top_k)])]
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties()
    smem = getattr(props, "shared_memory_per_block_optin", SMEM_BYTES)
    capability = (props.major, props.minor)
    if args.peak_tflops is None or args.bandwidth is None:
        from benchmarks.run import measure_ceilings

        ceilings = measure_ceilings()
        args.peak_tflops = args.peak_tflops or ceilings["bf16_TFLOPs"]
        args.bandwidth = args.bandwidth or ceilings["copy_GBps"]
    out = args.out or TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") + ".json")
    print(f"device: {device} (sm{capability[0]}{capability[1]}, {smem // 1024} KiB shared memory per block, "
          f"{args.bandwidth:.0f} GB/s, {args.peak_tflops:.0f} bf16 TFLOP/s); "
          f"writing {out if not args.dry_run else '(dry run)'}")
    for scheme, block in zip(schemes, blocks):
        for model, gemms in layers:
            if args.block_shape is None and scheme.tiled:  # the default tile, its K halved to fit (int4 on 2880)
                block = fitting_block(scheme, *(K for _, _, _, K, _, _ in gemms))
            # T = 1 on the real call (pair rows, fused activation and sum), where the benchmark's weights take
            # this scale tile; otherwise GEMM by GEMM like the other T
            t1 = model is not None and 1 in args.T and not args.aligned_t1 and bool(
                tune_t1(args, model, scheme, block, device, capability, smem, out))
            tune_layer(args, scheme, block, gemms, device, capability, smem, out, skip_t1=t1)


def tune_layer(args, scheme, block, gemms, device, capability, smem, out, skip_t1=False):
    """Both GEMMs of one layer (or one GEMM) at every T of ``args.T`` (``skip_t1``: but T = 1); merged into
    ``out`` after each T."""
    skey = scheme.table_key(block)
    chosen_bm: dict[int, int] = {}
    tokens = [T for T in args.T if not (skip_t1 and T == 1)]
    if not tokens:
        return
    for name, E, N, K, top_k, a_div in gemms:
        if scheme.weight is not None:
            try:
                scheme.weight.check_shape((E, N, K), block, 1, "w")
            except ValueError as exc:
                print(f"{skey} {name}: E={E} N={N} K={K}: skipped ({exc})")
                continue
        results = {}
        print(f"{skey} {name}: E={E} N={N} K={K} top_k={top_k}")
        print(f"{'T':>7} {'best us':>9} {'default us':>10} {'roof %':>7} {'copies':>6}  config")
        for T in tokens:
            problem = GemmProblem(T, E, N, K, top_k, a_div, scheme, block)
            fixed_bm = chosen_bm.get(T) if name == "gemm2" else None
            cands, default = candidates(T, top_k, E, N, K, scheme, block, args.space, fixed_bm, smem)
            best, us, default_us = tune_gemm(problem, cands, default, args.verbose)
            if best is None:
                print(f"{T:>7} no candidate ran")
                continue
            if name == "gemm1":
                chosen_bm[T] = best.block_m
            results[T] = (best, us)
            roof = problem.roofline_us(args.peak_tflops, args.bandwidth)
            dflt = f"{default_us:10.1f}" if default_us is not None else f"{'-':>10}"
            print(f"{T:>7} {us:9.1f} {dflt} {100 * roof / us:6.0f}% {len(problem.weights):>6}  {best}")
            del problem
            torch.cuda.empty_cache()
            if not args.dry_run:  # after every T, so an interrupted sweep keeps what it measured
                merge_into(out, device, E, N, K, skey, {T: results[T]}, capability)


#: tune.py's layers as benchmarks.shapes names them (activation, biases, routing)
SHAPE_OF_MODEL = {"mixtral": "mixtral-8x7b", "qwen3-30b-a3b": "qwen3-30b-a3b", "gpt-oss-20b": "gpt-oss-20b",
                  "deepseek-v3": "deepseek-v3"}


def t1_candidates(model: str, scheme: QuantScheme, block, space: str, smem: int, tp: int = 1):
    """(shape, GEMM1 candidates and default, GEMM2 candidates and default) of ``model``'s layer at T = 1: both
    GEMMs at BLOCK_M 16 (one pair a row block)."""
    import dataclasses

    from benchmarks.shapes import SHAPES

    shape = SHAPES[SHAPE_OF_MODEL[model]]
    shape = dataclasses.replace(shape, I=shape.I // tp)
    c1, d1 = candidates(1, shape.k, shape.E, shape.n1, shape.H, scheme, block, space, 16, smem)
    c2, d2 = candidates(1, shape.k, shape.E, shape.H, shape.I, scheme, block, space, 16, smem)
    return shape, (c1, d1), (c2, d2)


def tune_t1(args, model, scheme, block, device, capability, smem, out):
    """T = 1 on the call that runs: ``fused_moe`` of one token (pair rows, the activation fused into GEMM1, the
    sum into GEMM2), every candidate through a tuned table of its own (``benchmarks.tiles``), replayed in a CUDA
    graph over weight copies past L2 after a clean L2 flush. GEMM1's candidates with GEMM2's default tiles first,
    then GEMM2's with GEMM1's best; kept only if the output agrees with the default tiles'. Both entries record
    the whole call's µs. Returns False, tuning nothing, when the benchmark's weights (``benchmarks.run``) take
    another scale tile than ``block`` (a ``--block-shape`` of its own)."""
    import tempfile
    from types import SimpleNamespace

    import torch_moe_ops as moe
    from benchmarks.run import do_bench_ms, make_weights
    from benchmarks.tiles import tuned_dir, write_table

    shape, (c1, d1), (c2, d2) = t1_candidates(model, scheme, block, args.space, smem, args.tp)
    data = make_weights(shape, scheme.name)
    if tuple(data.block or ()) != tuple(block or ()):
        print(f"{scheme.name} T=1: the real call's weights take the tile {data.block}, not {block}: tuned GEMM "
              "by GEMM instead")
        return False
    skey = scheme.table_key(block)
    kw = dict(data.quant, activation=shape.activation, **shape.routing)
    if shape.bias:
        kw.update(w13_bias=data.b13, w2_bias=data.b2)
    per_set = sum(t.numel() * t.element_size() for t in (data.q13, data.q2))
    sets = [SimpleNamespace(q13=data.q13, q2=data.q2)] + [
        SimpleNamespace(q13=data.q13.clone(), q2=data.q2.clone()) for _ in range(min(7, int(2e8 // per_set)))]
    x = (torch.randn(1, shape.H, device="cuda") * 0.1).to(torch.bfloat16)
    logits = torch.randn(1, shape.E, device="cuda")
    print(f"{skey} fused_moe T=1 (the real call): E={shape.E} k={shape.k} H={shape.H} I={shape.I}, "
          f"{len(c1)} + {len(c2)} candidates")
    with tempfile.TemporaryDirectory() as root:
        count = iter(range(1 << 30))

        def run(g1, g2, timed=True):
            folder = write_table(f"{root}/{next(count)}", device, shape, skey, 1, g1, g2)
            with tuned_dir(folder):
                if not timed:
                    return moe.fused_moe(x, logits, data.q13, data.q2, shape.k, **kw).float()
                fn = lambda: [moe.fused_moe(x, logits, s.q13, s.q2, shape.k, **kw) for s in sets]  # noqa: E731
                return do_bench_ms(fn, graph=True, rep_ms=100, flush="read") * 1e3 / len(sets)

        def best_of(cands, pair):
            best, best_us, default_us = None, float("inf"), None
            for c in cands:
                try:
                    us = run(*pair(c))
                except Exception as exc:  # noqa: BLE001 - out of resources for this tile: skip it
                    if args.verbose:
                        print(f"    skip {c}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                if args.verbose:
                    print(f"    {us:9.1f} us  {c}")
                if us < best_us:
                    best, best_us = c, us
                if pair(c) == (d1, d2):
                    default_us = us
            return best, best_us, default_us

        b1, _, default_us = best_of(c1, lambda c: (c, d2))
        if b1 is None:
            print("    no GEMM1 candidate ran")
            return True
        b2, us, _ = best_of(c2, lambda c: (b1, c))
        if b2 is None:
            return True
        want, got = run(d1, d2, timed=False), run(b1, b2, timed=False)
        if not ((got - want).norm() <= 0.01 * want.norm() + 1e-6):
            print(f"    {b1} / {b2} disagree with the default tiles' output: not kept")
            return True
    dflt = f"{default_us:.1f}" if default_us is not None else "-"
    print(f"      1 {us:9.1f} us (default tiles {dflt} us)  GEMM1 {b1}  GEMM2 {b2}")
    if not args.dry_run:
        merge_into(out, device, shape.E, shape.n1, shape.H, skey, {1: (b1, us)}, capability)
        merge_into(out, device, shape.E, shape.H, shape.I, skey, {1: (b2, us)}, capability)
    return True


if __name__ == "__main__":
    main()
