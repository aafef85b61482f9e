"""Host-time A/B of compile variants inside one process: ``python -m benchmarks.host_ab --out DIR
--variants NAME=ENV[,ENV...] ...``, e.g.::

    python -m benchmarks.host_ab --out /tmp/ab --variants plans=TORCH_MOE_OPS_COMPILE=plans \\
        triton=TORCH_MOE_OPS_COMPILE=triton \\
        static=TORCH_MOE_OPS_COMPILE=triton,TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1

``benchmarks.host`` times each compile mode in its own process, and on the H100 hosts of 2026-12-07 the same code
moved by up to 2× between runs (docs/host-overhead.md, session 14): a lever of ~10 µs cannot be seen that way.
Here every variant of the 4-layer stack (``host.Stack``: router GEMM + ``fused_moe`` + residual, and the same
without the MoE calls) is compiled once in one process, under its environment variables (set while it is traced
and compiled; read there by the package and by Inductor), each as its own frame (a fresh code object, so Dynamo
keeps one graph per variant). Then ``--rounds`` rounds time every variant once, in a new random order each round:
``calls`` unsynchronized forwards of the stack with and without MoE back to back, so a round's marginal (host time
with − without, / layers) is measured within a few milliseconds. Reported per variant: the median and the 25–75 %
range of its marginal over rounds, and, against the first variant, the median of the per-round differences
(paired: a drift of the host moves both sides of a round). Also the compiled graphs' CUDA-graph time (their kernels
must not slow down). A variant ``NAME=eager`` runs the stack uncompiled (the eager path, plans replaying), the
eager target's figure in the same rounds. ``--smoke``: a tiny shape on CPU with aot_eager (exercises the code, measures nothing).
Writes ``DIR/host_ab.json``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import types
from contextlib import contextmanager

import torch

from benchmarks.env import Log, csv_arg, env_info, write_env, write_json
from benchmarks.host import SCHEMES, SMOKE_SHAPE, STACK_LAYERS, Stack, _sync, _warm, graph_us
from benchmarks.shapes import SHAPES


@contextmanager
def _environment(assignments: dict):
    """``os.environ`` with ``assignments`` set (the package reads its switches when a graph is traced; Inductor
    reads ``TORCHINDUCTOR_*`` through its config, re-read here), restored after."""
    from torch._inductor import config as inductor_config

    saved = {k: os.environ.get(k) for k in assignments}
    patched = {}
    os.environ.update(assignments)
    for key, value in assignments.items():  # Inductor reads its env-backed options once, at import
        name = key.removeprefix("TORCHINDUCTOR_").lower()
        if key.startswith("TORCHINDUCTOR_") and isinstance(getattr(inductor_config, name, None), bool):
            patched[name] = value.strip().lower() not in ("0", "", "false", "off", "no")
    try:
        with inductor_config.patch(patched):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _own_frame(fn, name: str):
    """``fn`` with a code object of its own (Dynamo caches compiled graphs per code object and would otherwise
    serve every variant the first one's graph)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{name}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


EAGER = "eager"  #: a variant spec that runs the stack uncompiled (the package's eager path: plans replaying)


def _variant(text: str) -> tuple[str, dict | None]:
    """``NAME=VAR=VALUE[,VAR=VALUE...]`` -> (NAME, {VAR: VALUE}); ``NAME=eager`` -> (NAME, None)."""
    name, _, spec = text.partition("=")
    if name and spec == EAGER:
        return name, None
    pairs = [p for p in spec.split(",") if p]
    if not name or any("=" not in p for p in pairs):
        raise argparse.ArgumentTypeError(f"a variant is NAME=VAR=VALUE[,VAR=VALUE...] or NAME=eager, got {text!r}")
    return name, dict(p.split("=", 1) for p in pairs)


def _compile(stack: Stack, x: torch.Tensor, name: str, env: dict | None, backend: str, device):
    """(the variant's callable, seconds of its first call); ``env`` None: the stack itself, uncompiled."""
    def forward(x):
        return stack(x)

    if env is None:
        start = time.perf_counter()
        _warm(lambda: stack(x), device)
        return stack, time.perf_counter() - start
    fn = torch.compile(_own_frame(forward, name), fullgraph=True, dynamic=True, backend=backend)
    with _environment(env):
        start = time.perf_counter()
        fn(x)
        _sync(device)
        seconds = time.perf_counter() - start
        _warm(lambda: fn(x), device)
    return fn, seconds


def _enqueue_us(fn, x, calls: int, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    elapsed = time.perf_counter() - start
    _sync(device)
    return elapsed / calls * 1e6


def bench(scheme: str, T: int, variants: list, args, device, shape) -> dict:
    """One (scheme, T) cell: every variant compiled, then ``args.rounds`` interleaved rounds."""
    stacks = Stack(shape, scheme, STACK_LAYERS, device), Stack(shape, scheme, STACK_LAYERS, device, moe_calls=False)
    x = (torch.randn(T, shape.H, generator=torch.Generator().manual_seed(T)) * 0.1).to(torch.bfloat16).to(device)
    compiled = {}
    for name, env in variants:
        moe_fn, moe_s = _compile(stacks[0], x, name, env, args.backend, device)
        base_fn, _ = _compile(stacks[1], x, name + "_nomoe", env, args.backend, device)
        compiled[name] = (moe_fn, base_fn, moe_s)
    marginals = {name: [] for name, _ in variants}
    rng = random.Random(0)
    order = [name for name, _ in variants]
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            moe_fn, base_fn, _ = compiled[name]
            with_moe = _enqueue_us(moe_fn, x, args.calls, device)
            without = _enqueue_us(base_fn, x, args.calls, device)
            marginals[name].append((with_moe - without) / STACK_LAYERS)
    first = variants[0][0]
    row = dict(scheme=scheme, T=T, layers=STACK_LAYERS, rounds=args.rounds, calls=args.calls, variants={})
    for name, env in variants:
        m = marginals[name]
        q = statistics.quantiles(m, n=4) if len(m) > 1 else [m[0]] * 3
        cell = dict(env=env if env is not None else EAGER, marginal_us=statistics.median(m), marginal_us_q25=q[0], marginal_us_q75=q[2],
                    compile_s=compiled[name][2])
        if name != first:  # paired: this round's value against the first variant's of the same round
            cell["minus_first_us"] = statistics.median(a - b for a, b in zip(m, marginals[first]))
        moe_fn = compiled[name][0]
        with _environment(env or {}):
            g = graph_us(lambda: moe_fn(x), device)
        cell["graph_us"] = g
        row["variants"][name] = cell
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", type=_variant, required=True, help="NAME=VAR=VALUE[,VAR=VALUE...]")
    p.add_argument("--schemes", type=csv_arg(str, SCHEMES), default=["none", "fp8_block"])
    p.add_argument("--tokens", type=csv_arg(int), default=[1])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30; --smoke 2)")
    p.add_argument("--calls", type=int, default=None, help="forwards a timing (default 10; --smoke 2)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU, aot_eager")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.smoke else 30)
    args.calls = args.calls or (2 if args.smoke else 10)
    args.backend = "aot_eager" if args.smoke else "inductor"
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE_SHAPE if args.smoke else SHAPES["qwen3-30b-a3b"]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    log, env = Log(), env_info(device)
    os.makedirs(args.out, exist_ok=True)
    write_env(args.out, env)
    path = os.path.join(args.out, "host_ab.json")
    rows: list = []
    with torch.no_grad():
        for scheme in args.schemes:
            for T in args.tokens:
                row = bench(scheme, T, args.variants, args, device, shape)
                rows.append(row)
                write_json(path, env, rows, smoke=args.smoke)
                parts = []
                for name, c in row["variants"].items():
                    diff = f", {c['minus_first_us']:+.1f} vs {args.variants[0][0]}" if "minus_first_us" in c else ""
                    parts.append(f"{name} {c['marginal_us']:.1f} us [{c['marginal_us_q25']:.1f}-"
                                 f"{c['marginal_us_q75']:.1f}]{diff}")
                log(f"ab {scheme:<9} T={T:<4} marginal per MoE layer: " + "; ".join(parts))
                torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
