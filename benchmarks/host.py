"""Host time per call of ``torch.ops.moe.fused_moe`` / ``fused_experts`` and of a 4-layer Qwen3-shaped stack:
``python -m benchmarks.host --out DIR`` writes ``DIR/host.json`` and appends to ``DIR/env.txt``.

What is measured (docs/performance.md, "Host time and end to end"):

- ``host_us_eager``: the time the host takes to enqueue one call. ``torch.cuda.synchronize()``, then
  ``time.perf_counter()`` around ``calls`` back-to-back calls, the clock stopped *before* synchronizing again;
  divided by ``calls``; the median of ``repeats`` (10) such runs, after warm-up. ``calls`` is small (20 by
  default): even where the GPU is slower than the host (Mixtral at T=256), 20 calls of about ten launches
  each leave at most a few hundred launches pending, well below the depth (about a thousand) at which a CUDA
  launch starts to block, so the host never waits for the GPU and the figure is pure enqueue time.
- ``host_us_eager_public``: the same through the package's function (``torch_moe_ops.fused_moe``), which calls
  the CUDA kernel without the dispatcher when nothing needs it (what the layer and most users call).
- ``host_us_compiled``: the same for ``torch.compile(fn, fullgraph=True, dynamic=True)`` (default mode), fn
  calling the op once: the standalone compiled call, guards included. ``frames``: graphs dynamo compiled for
  the cell (a fresh ``torch._dynamo.reset()`` per cell: 1 expected); ``recompiles``: graphs compiled during
  the timed calls (0 expected; anything else shows in the row).
- ``graph_us``: GPU time of one call replayed from a CUDA graph (``benchmarks.run.do_bench_ms``).
- ``compile_mode``: what the compiled graphs call (``TORCH_MOE_OPS_COMPILE``, ops/decompose.py): ``plans`` the
  lean inference op, ``triton`` our kernels launched by Inductor, ``opaque`` the public op.
- The stack (``--only stack``): 4 layers of router ``nn.Linear(H, E, bf16)`` -> ``torch_moe_ops.fused_moe`` (the
  public function, as the layer calls it; before session 6, ``torch.ops.moe.fused_moe``) -> residual add,
  x [T, H] bf16. ``eager_ms`` / ``compiled_ms``: GPU-synchronized wall time per forward; ``*_host_ms``: enqueue
  time per forward as above; ``graph_ms``: CUDA-graph replay of the eager stack; ``compiled_graph_ms``: of the
  compiled one (its kernels must be as fast); ``nomoe_*``: the same stack without the MoE calls (router +
  residual add of one router column, so the router is not dead code);
  ``marginal_us_compiled`` = (compiled_host_ms - nomoe_compiled_host_ms) / layers, the host cost one MoE layer
  adds inside a compiled graph (``marginal_us_eager`` likewise); ``*_min``: the same from each variant's fastest
  run (a busy host inflates it least).

``--smoke``: one tiny shape on CPU (reference kernels, aot_eager backend): host times there mean nothing, the
code path is what is exercised.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

from benchmarks.env import Log, csv_arg, env_info, write_env, write_json
from benchmarks.shapes import SHAPES, MoEShape

import torch_moe_ops as moe
from torch_moe_ops import _platform
from torch_moe_ops.testing import experts_kwargs, quantize_experts

OPS = ("fused_moe", "fused_experts")
SCHEMES = ("none", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16")
SHAPE_KEYS = ("qwen3-30b-a3b", "mixtral-8x7b")
TOKENS = (1, 256)
STACK_SCHEMES = ("none", "fp8_block")  #: none = bf16
STACK_LAYERS = 4
SMOKE_SHAPE = MoEShape("Tiny-MoE", 8, 2, 256, 128)  #: H, I fit fp8 128x128 tiles and int4 G=128
SMOKE_TOKENS = (1, 4)

HOST_KEYS = ("op", "scheme", "shape", "T", "host_us_eager", "host_us_compiled", "graph_us")
STACK_KEYS = ("stack", "scheme", "T", "eager_ms", "compiled_ms", "graph_ms", "eager_host_ms", "compiled_host_ms",
              "nomoe_compiled_host_ms", "marginal_us_compiled", "marginal_us_eager")


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_us(fn, calls: int, repeats: int, device: torch.device, *, wait: bool, runs: list | None = None) -> float:
    """Median over ``repeats`` of the time of ``calls`` calls, per call, in µs; ``wait``: the clock stops after
    the synchronize that ends each run (what a caller waits), else before it (enqueue time only). ``runs``: gets
    every run's figure (µs)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait:
            _sync(device)
        elapsed = time.perf_counter() - start
        _sync(device)
        times.append(elapsed / calls)
    if runs is not None:
        runs.extend(t * 1e6 for t in times)
    return statistics.median(times) * 1e6


def enqueue_us(fn, calls: int, repeats: int, device: torch.device, runs: list | None = None) -> float:
    """Host time to enqueue one call (the clock stops before synchronizing); ``runs`` as in ``_per_call_us``."""
    return _per_call_us(fn, calls, repeats, device, wait=False, runs=runs)


def _host_columns(row: dict, name: str, fn, args, device) -> None:
    """``row[name]``: the median enqueue time; ``row[name + "_min"]``: the fastest run's, which a busy host
    (other tenants, preemption) inflates least: on the H100 hosts of 2026-12-07 medians of the same code moved
    by up to 2x between runs."""
    runs: list = []
    row[name] = enqueue_us(fn, args.calls, args.repeats, device, runs)
    row[name + "_min"] = min(runs)


def wall_us(fn, calls: int, repeats: int, device: torch.device) -> float:
    """Time a caller waits per call: ``calls`` calls, then synchronize."""
    return _per_call_us(fn, calls, repeats, device, wait=True)


def graph_us(fn, device: torch.device) -> float | None:
    """GPU time of one ``fn()`` replayed from a CUDA graph (``benchmarks.run.do_bench_ms``); None on CPU."""
    if device.type != "cuda":
        return None
    from benchmarks.run import do_bench_ms

    return do_bench_ms(fn, graph=True) * 1e3


def _warm(fn, device: torch.device, n: int = 3) -> None:
    for _ in range(n):
        fn()
    _sync(device)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Compiled:
    """``torch.compile(fn, fullgraph=True, dynamic=True, backend=...)`` from a fresh dynamo state; ``frames``:
    graphs compiled by the first call (and its warm-up), ``recompiles()``: graphs compiled since."""

    def __init__(self, fn, args: tuple, device: torch.device, backend: str):
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self.fn = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
        self.args = args
        start = time.perf_counter()
        self()
        _sync(device)
        self.compile_s = time.perf_counter() - start
        _warm(self, device)
        self.frames = unique_graphs()

    def __call__(self):
        return self.fn(*self.args)

    def recompiles(self) -> int:
        return unique_graphs() - self.frames


# ------------------------------------------------------------------------------------------ weights
def bf16_experts(shape: MoEShape, device: torch.device, seed: int = 0):
    """w13 [E, N1, H], w2 [E, H, I] bf16, ``randn * 0.05``, drawn on ``device`` (a CPU draw of Mixtral's 1.4 G
    elements would take seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(shape.E, shape.n1, shape.H, device=device, generator=g).mul_(0.05).to(torch.bfloat16)
    w2 = torch.randn(shape.E, shape.H, shape.I, device=device, generator=g).mul_(0.05).to(torch.bfloat16)
    return w13, w2


def expert_weights(shape: MoEShape, scheme: str, w13: torch.Tensor, w2: torch.Tensor):
    """(w13, w2, s13, s2, kwargs) for ``shape`` in ``scheme`` (``torch_moe_ops.testing.quantize_experts``): the
    quantized storage and scales, and the op's string / list keywords (quant_scheme, block_shape)."""
    q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme, shape.activation)
    kw = {k: v for k, v in experts_kwargs(scheme, s13, s2, block).items() if k not in ("w13_scale", "w2_scale")}
    return q13, q2, s13, s2, kw


def op_fn(op: str, k: int, kw: dict, public: bool = False):
    """The function timed, tensors as arguments: fused_moe(x, logits, ...) or fused_experts(x, weights, ids,
    ...), one ``torch.ops.moe`` call (``public``: the package's function instead, which skips the dispatcher
    when nothing needs it)."""
    ns = moe if public else torch.ops.moe
    if op == "fused_moe":
        def fn(x, logits, w13, w2, s13, s2):
            return ns.fused_moe(x, logits, w13, w2, k, w13_scale=s13, w2_scale=s2, **kw)
    else:
        def fn(x, topk_weights, topk_ids, w13, w2, s13, s2):
            return ns.fused_experts(x, w13, w2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2, **kw)
    return fn


def bench_cell(op, shape, scheme, T, weights, args, device) -> dict:
    q13, q2, s13, s2, kw = weights
    torch.manual_seed(T)
    x = (torch.randn(T, shape.H, device=device) * 0.1).to(torch.bfloat16)
    logits = torch.randn(T, shape.E, device=device)
    fn = op_fn(op, shape.k, kw)
    if op == "fused_moe":
        call_args = (x, logits, q13, q2, s13, s2)
    else:
        topk_w, topk_ids = moe.topk_route(logits, shape.k)
        call_args = (x, topk_w, topk_ids, q13, q2, s13, s2)
    eager = lambda: fn(*call_args)  # noqa: E731
    _warm(eager, device)
    row = dict(op=op, scheme=scheme, shape=shape.name, T=T)
    _host_columns(row, "host_us_eager", eager, args, device)
    public = op_fn(op, shape.k, kw, public=True)
    eager_public = lambda: public(*call_args)  # noqa: E731
    _warm(eager_public, device)
    _host_columns(row, "host_us_eager_public", eager_public, args, device)
    compiled = Compiled(fn, call_args, device, args.backend)
    _host_columns(row, "host_us_compiled", compiled, args, device)
    row["graph_us"] = graph_us(eager, device)
    row.update(frames=compiled.frames, recompiles=compiled.recompiles(), compile_s=compiled.compile_s,
               calls=args.calls, repeats=args.repeats, compile_mode=_platform.compile_mode())
    torch._dynamo.reset()
    return row


def run_host(args, device, shapes, log, rows, flush) -> None:
    for key in shapes:
        shape = SMOKE_SHAPE if args.smoke else SHAPES[key]
        w13, w2 = bf16_experts(shape, device)
        for scheme in args.schemes:
            try:
                weights = expert_weights(shape, scheme, w13, w2)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                rows += [dict(op=op, scheme=scheme, shape=shape.name, T=T, error=repr(exc)[:300])
                         for op in args.ops for T in args.tokens]
                log(f"{shape.name} {scheme}: weights FAILED {exc!r}"[:300])
                continue
            for op in args.ops:
                for T in args.tokens:
                    try:
                        row = bench_cell(op, shape, scheme, T, weights, args, device)
                    except Exception as exc:  # noqa: BLE001
                        torch._dynamo.reset()
                        row = dict(op=op, scheme=scheme, shape=shape.name, T=T, error=repr(exc)[:300])
                    rows.append(row)
                    flush()
                    if "error" in row:
                        log(f"{op:<13} {shape.name:<14} {scheme:<11} T={T:<4} FAILED {row['error']}")
                    else:
                        g_us = "-" if row["graph_us"] is None else f"{row['graph_us']:.1f}"
                        host = ", ".join(f"{label} {row[k]:.1f} (min {row[k + '_min']:.1f})" for label, k in (
                            ("eager", "host_us_eager"), ("public", "host_us_eager_public"),
                            ("compiled", "host_us_compiled")))
                        log(f"{op:<13} {shape.name:<14} {scheme:<11} T={T:<4} host us: {host}; frames {row['frames']}, "
                            f"recompiles {row['recompiles']}; graph {g_us} us")
            del weights
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del w13, w2


# ------------------------------------------------------------------------------------------ the stack
class Stack(nn.Module):
    """``layers`` x (router ``nn.Linear(H, E, bf16)`` -> ``torch.ops.moe.fused_moe`` -> residual add) on x [T, H]
    bf16. ``moe=False``: the MoE call removed, the residual adds the router's first column instead (so the
    router stays live code)."""

    def __init__(self, shape: MoEShape, scheme: str, layers: int, device, moe_calls: bool = True, seed: int = 0):
        super().__init__()
        self.k, self.moe_calls, self.layers = shape.k, moe_calls, layers
        g = torch.Generator(device=device).manual_seed(seed)
        self.routers = nn.ModuleList()
        self.kw = {}
        for i in range(layers):
            router = nn.Linear(shape.H, shape.E, bias=False, dtype=torch.bfloat16, device=device)
            with torch.no_grad():
                router.weight.copy_(torch.randn(shape.E, shape.H, device=device, generator=g) * shape.H**-0.5)
            self.routers.append(router)
            if moe_calls:
                w13, w2 = bf16_experts(shape, device, seed=seed * 1000 + i + 1)
                q13, q2, s13, s2, self.kw = expert_weights(shape, scheme, w13, w2)
                del w13, w2
                for name, t in (("w13", q13), ("w2", q2), ("s13", s13), ("s2", s2)):
                    self.register_buffer(f"{name}_{i}", t)
        self.requires_grad_(False)

    def forward(self, x):
        for i, router in enumerate(self.routers):
            logits = router(x)
            if self.moe_calls:  # the package's function: what the layer calls (no dispatcher in eager)
                x = x + moe.fused_moe(x, logits, getattr(self, f"w13_{i}"), getattr(self, f"w2_{i}"),
                                                self.k, w13_scale=getattr(self, f"s13_{i}"),
                                                w2_scale=getattr(self, f"s2_{i}"), **self.kw)
            else:
                x = x + logits[:, :1]
        return x


def _stack_variant(stack: Stack, x: torch.Tensor, prefix: str, args, device) -> dict:
    """One stack on one x: eager / compiled host and wall time, CUDA-graph time, frames (keys ``prefix*``)."""
    calls, repeats = args.stack_calls, args.repeats
    eager = lambda: stack(x)  # noqa: E731
    _warm(eager, device)
    runs: list = []
    out = {f"{prefix}eager_host_ms": enqueue_us(eager, calls, repeats, device, runs) / 1e3,
           f"{prefix}eager_ms": wall_us(eager, calls, repeats, device) / 1e3}
    out[f"{prefix}eager_host_ms_min"], runs = min(runs) / 1e3, []
    compiled = Compiled(stack, (x,), device, args.backend)
    out[f"{prefix}compiled_host_ms"] = enqueue_us(compiled, calls, repeats, device, runs) / 1e3
    out[f"{prefix}compiled_host_ms_min"] = min(runs) / 1e3
    out[f"{prefix}compiled_ms"] = wall_us(compiled, calls, repeats, device) / 1e3
    g = graph_us(eager, device)
    out[f"{prefix}graph_ms"] = None if g is None else g / 1e3
    try:  # the compiled graph's kernels, captured: the decomposition must not make them slower (issue target)
        g = graph_us(compiled, device)
    except Exception:  # noqa: BLE001 - a graph that cannot be captured shows as None
        g = None
    out[f"{prefix}compiled_graph_ms"] = None if g is None else g / 1e3
    out.update({f"{prefix}frames": compiled.frames, f"{prefix}recompiles": compiled.recompiles(),
                f"{prefix}compile_s": compiled.compile_s})
    torch._dynamo.reset()
    return out


def bench_stack(stacks: dict, shape: MoEShape, scheme: str, T: int, args, device) -> dict:
    """A stack row: the MoE stack and the one without MoE calls on the same x [T, H]; the marginal host cost
    of one MoE layer = (host time with - without) / layers."""
    row = dict(stack=f"{shape.name.split('-')[0].lower()}-{STACK_LAYERS}layer", scheme=scheme, T=T,
               layers=STACK_LAYERS, shape=shape.name)
    x = (torch.randn(T, shape.H, generator=torch.Generator().manual_seed(T)) * 0.1).to(torch.bfloat16).to(device)
    row.update(_stack_variant(stacks["moe"], x, "", args, device))
    row.update(_stack_variant(stacks["nomoe"], x, "nomoe_", args, device))
    for mode in ("compiled", "eager"):
        row[f"marginal_us_{mode}"] = (row[f"{mode}_host_ms"] - row[f"nomoe_{mode}_host_ms"]) * 1e3 / STACK_LAYERS
        # the same from each variant's fastest run, which a busy host inflates least
        row[f"marginal_us_{mode}_min"] = ((row[f"{mode}_host_ms_min"] - row[f"nomoe_{mode}_host_ms_min"]) * 1e3
                                          / STACK_LAYERS)
    row.update(calls=args.stack_calls, repeats=args.repeats, compile_mode=_platform.compile_mode())
    return row


def run_stack(args, device, log, rows, flush) -> None:
    shape = SMOKE_SHAPE if args.smoke else SHAPES["qwen3-30b-a3b"]
    name = f"{shape.name.split('-')[0].lower()}-{STACK_LAYERS}layer"
    for scheme in args.stack_schemes:
        try:
            stacks = {"moe": Stack(shape, scheme, STACK_LAYERS, device),
                      "nomoe": Stack(shape, scheme, STACK_LAYERS, device, moe_calls=False)}
        except Exception as exc:  # noqa: BLE001
            rows += [dict(stack=name, scheme=scheme, T=T, error=repr(exc)[:300]) for T in args.tokens]
            log(f"stack {scheme}: weights FAILED {exc!r}"[:300])
            continue
        for T in args.tokens:
            try:
                row = bench_stack(stacks, shape, scheme, T, args, device)
            except Exception as exc:  # noqa: BLE001
                torch._dynamo.reset()
                row = dict(stack=name, scheme=scheme, T=T, error=repr(exc)[:300])
            rows.append(row)
            flush()
            if "error" in row:
                log(f"stack {scheme:<9} T={T:<4} FAILED {row['error']}")
                continue
            gms = "-" if row["graph_ms"] is None else f"{row['graph_ms']:.3f}"
            log(f"stack {scheme:<9} T={T:<4} eager {row['eager_ms']:.3f} ms (host {row['eager_host_ms']:.3f}), "
                f"compiled {row['compiled_ms']:.3f} ms (host {row['compiled_host_ms']:.3f}; no MoE "
                f"{row['nomoe_compiled_host_ms']:.3f}), graph {gms} ms (compiled "
                f"{row['compiled_graph_ms'] or float('nan'):.3f}); marginal per MoE layer: compiled "
                f"{row['marginal_us_compiled']:.1f} us, eager {row['marginal_us_eager']:.1f} us (fastest runs: "
                f"{row['marginal_us_compiled_min']:.1f}, {row['marginal_us_eager_min']:.1f})")
        del stacks
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for host.json and env.txt")
    p.add_argument("--only", choices=("host", "stack"), help="only the per-op cells / only the 4-layer stack")
    p.add_argument("--smoke", action="store_true", help="one tiny shape on CPU, few calls (exercises the code)")
    p.add_argument("--ops", type=csv_arg(str, OPS), default=list(OPS))
    p.add_argument("--schemes", type=csv_arg(str, SCHEMES), default=list(SCHEMES))
    p.add_argument("--stack-schemes", type=csv_arg(str, SCHEMES), default=list(STACK_SCHEMES))
    p.add_argument("--shapes", type=csv_arg(str, SHAPE_KEYS), default=list(SHAPE_KEYS))
    p.add_argument("--tokens", type=csv_arg(int), default=None,
                   help=f"T values (default {TOKENS}; --smoke {SMOKE_TOKENS})")
    p.add_argument("--calls", type=int, default=None, help="calls per timed run (default 20; --smoke 3)")
    p.add_argument("--stack-calls", type=int, default=None, help="stack forwards per timed run (default 10; --smoke 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median taken (default 10; --smoke 2)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --smoke aot_eager)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default cuda (--smoke: cpu)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(tokens=list(SMOKE_TOKENS if smoke else TOKENS), calls=3 if smoke else 20,
                    stack_calls=2 if smoke else 10, repeats=2 if smoke else 10,
                    backend="aot_eager" if smoke else "inductor", device="cpu" if smoke else "cuda")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --smoke or --device cpu)")
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    log = Log()
    env = env_info(device)
    os.makedirs(args.out, exist_ok=True)
    write_env(args.out, env)
    path = os.path.join(args.out, "host.json")
    rows: list = []
    method = {"calls": args.calls, "stack_calls": args.stack_calls, "repeats": args.repeats, "backend": args.backend,
              "compile": "torch.compile(fn, fullgraph=True, dynamic=True), default mode, fresh dynamo state per cell",
              "host": "perf_counter around `calls` unsynchronized calls (synchronize before, clock stopped before "
                      "the synchronize after), / calls, median of `repeats` (`*_min`: the fastest run)",
              "graph": "benchmarks.run.do_bench_ms(fn, graph=True): CUDA-graph replay, median",
              "grad_mode": "torch.no_grad() (as generate)"}
    flush = lambda: write_json(path, env, rows, method=method, smoke=args.smoke)  # noqa: E731
    log(f"host.py on {env['device']} (torch {env['torch']}, triton {env['triton']}); writing {path}")
    # no_grad, as transformers' generate: inference_mode would skip the autograd dispatch and flatter the figures.
    # The stack first: a run cut short (HOST_S) loses op cells, not the marginals.
    with torch.no_grad():
        if args.only in (None, "stack"):
            run_stack(args, device, log, rows, flush)
        if args.only in (None, "host"):
            run_host(args, device, args.shapes[:1] if args.smoke else args.shapes, log, rows, flush)
    flush()
    failed = sum("error" in r for r in rows)
    log(f"wrote {path}: {len(rows)} rows, {failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
