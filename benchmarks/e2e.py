"""End to end: Hugging Face ``generate`` decode tokens/s of a Qwen3-30B-A3B-shaped ``Qwen3MoeForCausalLM`` with
transformers' experts and with ours: ``python -m benchmarks.e2e --out DIR`` writes ``DIR/e2e.json`` and
appends to ``DIR/env.txt``.

The model: hidden 2048, 128 experts of moe_intermediate 768, top-8 (norm_topk_prob), 32 query / 4 key-value heads
of head_dim 128, vocab 151936, ``--layers`` decoder layers (default 24: ~31 GB of bf16), every layer sparse.
Random bf16 weights drawn on the GPU with a fixed seed per parameter name (``fill_weights``), so every impl
gets the same weights without a 31 GB host copy (``weights_sum`` in each row shows it); one model on the GPU
at a time, freed between impls.

Impls: ``hf_eager`` (transformers' per-expert loop, ``experts_implementation="eager"``), ``hf_grouped_mm``
(transformers 5.25's default; its ``generate`` switches it to ``batched_mm`` for the decode steps on CUDA),
``ours_<scheme>``: the eager-experts model after ``torch_moe_ops.integrations.transformers.patch(model,
quant_config)`` with None (bf16), fp8_block, int8_w8a16, int4_w4a16, mxfp4.

Modes (``torch_moe_ops.demo.measure.generation_setup``): ``eager``: ``generate`` as is (DynamicCache);
``compiled``: transformers' own compile path: ``cache_implementation="static"`` and ``compile_config=
CompileConfig(fullgraph=True, dynamic=False, mode="default")`` (fullgraph=False for hf_eager, whose loop over
the hit experts is data-dependent); the prefill runs eagerly, each decode step through the compiled forward.

Decode tok/s (``measure.decode_rate``): greedy, batch B, prompt P random tokens; after a warm-up (compile
included, timed as ``compile_s``), t(P + n) and t(P + 1) with n = 64: tok/s = B (n - 1) / (t(P + n) - t(P + 1)):
the difference is n - 1 decode steps, prefill and setup cancel. ``step_ms`` = the time of one decode step.

Per-step split (one more ``generate`` of P + 3 under ``torch.profiler``, CPU + CUDA, after the timing):
``moe_ms``: host wall time inside the MoE parts per decode step, i.e. what they cost a host-bound step. Eager:
the MoE blocks (``layer.mlp``, router included), bracketed by ``record_function`` hooks named with the token
count so that prefill blocks are told apart. Compiled: dynamo drops ``record_function``, and Inductor fuses
transformers' experts into its own kernels, so only ours has a boundary: the ``moe::*`` custom-op events of the
decode steps (router excluded); None for hf compiled rows. ``moe_kernel_ms``: the GPU kernel time launched from
those same events per step. ``moe_graph_ms``: the same part, one layer at the decode shape [B, 1, H] captured in
a CUDA graph and replayed (``benchmarks.run.do_bench_ms``), times layers: the GPU time the MoE part needs
without launch overhead (None where capture fails, e.g. the eager loop's host sync). ``moe_vs_graph`` =
moe_ms / moe_graph_ms: the issue's target is <= 1.3 for ours compiled. ``other_ms`` = step_ms - moe_ms.

Each row in its own try/except (``error`` recorded; a crash in one mode keeps the others). ``--budget-s`` (GPU
default 480): a row whose expected cost (the slowest row of its mode so far) would end past the budget is
recorded as skipped, so the run ends in time. Rows run batch by batch (all impls at batch 1 first), within a
batch impl by impl. ``--quick``: batch 1, ours_none + ours_fp8_block + hf_grouped_mm. ``--smoke``: a 2-layer
tiny model on CPU (aot_eager backend).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
import zlib

import torch

from benchmarks.env import Log, csv_arg, env_info, write_env, write_json

IMPLS = ("ours_none", "ours_fp8_block", "hf_grouped_mm", "ours_int8_w8a16", "ours_int4_w4a16", "ours_mxfp4", "hf_eager")
QUICK_IMPLS = ("ours_none", "ours_fp8_block", "hf_grouped_mm")
#: compiled = CompileConfig(mode="default"); graphs = mode="reduce-overhead" (transformers' CompileConfig default,
#: CUDA graphs: the host cost per op leaves the step; opt-in, --modes eager,compiled,graphs)
MODES = ("eager", "compiled", "graphs")
DEFAULT_MODES = ("eager", "compiled")
BATCHES = (1, 8)
MODEL = "qwen3-30b-a3b"
#: Qwen3-30B-A3B's text config (48 layers there; --layers picks how many here)
FULL = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
            num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
#: --smoke: H and I fit fp8's 128x128 tiles and int4's G=128
SMOKE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ROW_KEYS = ("model", "impl", "scheme", "mode", "layers", "batch", "tok_s", "step_ms", "moe_ms", "moe_kernel_ms",
            "moe_graph_ms")
#: first guesses of a row's cost in seconds (replaced by the slowest row seen of each mode)
COST_GUESS = {"eager": 20.0, "compiled": 75.0, "graphs": 90.0, "build": 15.0}


def qwen3_config(layers: int, smoke: bool, max_positions: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**(SMOKE if smoke else FULL), num_hidden_layers=layers, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=max_positions,
                          tie_word_embeddings=False, use_sliding_window=False)


def fill_weights(model, seed: int) -> float:
    """Every parameter drawn from its own generator (seed, crc32 of its name) on its own device: 1-D (norms)
    ones, the rest ``randn * fan_in**-0.5`` (activations keep their scale; the router's logits are O(1), so
    routing is spread like a trained model's). Returns the sum of a slice of every tensor (the same weights give
    the same number in every row)."""
    total = 0.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            total += float(p.reshape(-1)[:4096].float().sum())
    return total


def build(impl: str, config, device, seed: int, smoke: bool):
    """A fresh model for ``impl`` on ``device`` with the seeded weights; ours: patched. Returns (model,
    weights_sum, patch report or None)."""
    from transformers import AutoModelForCausalLM

    experts = "grouped_mm" if impl == "hf_grouped_mm" else "eager"
    with torch.device(device):  # built where it runs: no 31 GB host copy
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, experts_implementation=experts)
    if any(p.device.type != device.type for p in model.parameters()):  # a transformers that builds elsewhere
        model.to(device)
    model.eval().requires_grad_(False)
    wsum = fill_weights(model, seed)
    report = None
    if impl.startswith("ours_"):
        from torch_moe_ops.demo.pipeline import quant_config
        from torch_moe_ops.integrations.transformers import patch

        scheme = impl[len("ours_"):]
        report = patch(model, quant_config(scheme, config.hidden_size, config.moe_intermediate_size, flag="--impls"))
        if report.skipped or not report.replaced:
            raise RuntimeError(f"patch replaced {len(report.replaced)} blocks, skipped {report.skipped}")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model, wsum, report


def free(model=None) -> None:
    del model
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------ the split
def moe_blocks(model) -> list:
    return [layer.mlp for layer in model.model.layers]


class BlockRanges:
    """``with BlockRanges(blocks):`` each block's forward inside ``record_function("moe_block[T=n]")`` (n =
    tokens in the call), through forward hooks (eager mode only: hooks added to a compiled model would
    recompile it, and dynamo drops ``record_function`` anyway)."""

    def __init__(self, blocks):
        self.blocks, self.handles, self.open = blocks, [], []

    def _pre(self, module, args):
        x = args[0]
        rf = torch.autograd.profiler.record_function(f"moe_block[T={x.numel() // x.shape[-1]}]")
        rf.__enter__()
        self.open.append(rf)

    def _post(self, module, args, out):
        self.open.pop().__exit__(None, None, None)

    def __enter__(self):
        for b in self.blocks:
            self.handles += [b.register_forward_pre_hook(self._pre), b.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _top_level(events: list) -> list:
    chosen = set(map(id, events))
    out = []
    for e in events:
        parent = e.cpu_parent
        while parent is not None and id(parent) not in chosen:
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


def decode_events(events, batch: int, eager: bool) -> list:
    """The profiler events that bracket the MoE part of decode steps: eager, the hooks' ranges for T = batch;
    compiled, the outermost ``moe::*`` op events whose first input has ``batch`` rows."""
    if eager:
        return [e for e in events if e.name == f"moe_block[T={batch}]"]
    ops = [e for e in events if e.name.startswith("moe::") and e.input_shapes and e.input_shapes[0]
           and e.input_shapes[0][0] == batch]
    return _top_level(ops)


def profile_split(model, prompt, layers: int, eager: bool, cuda: bool, new_tokens: int = 3) -> dict:
    """One ``generate`` of P + ``new_tokens`` under the profiler -> moe_ms and moe_kernel_ms per decode step
    (steps counted from the events: MoE parts found / layers). Few tokens: transformers' eager loop at batch 8
    makes ~15k events a step, and the profiler's post-processing of them is slower than the run."""
    from torch.profiler import ProfilerActivity, profile

    from torch_moe_ops.demo.measure import generate

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    blocks = moe_blocks(model)
    with profile(activities=activities, record_shapes=not eager) as prof:  # eager: the ranges' names say T
        if eager:
            with BlockRanges(blocks):
                generate(model, prompt, new_tokens)
        else:
            generate(model, prompt, new_tokens)
    found = decode_events(prof.events(), prompt.shape[0], eager)
    if not found:
        return {"moe_ms": None, "moe_kernel_ms": None, "profiled_steps": 0}
    steps = len(found) / layers
    return {"moe_ms": sum(e.cpu_time_total for e in found) / 1e3 / steps,
            "moe_kernel_ms": (sum(e.device_time_total for e in found) / 1e3 / steps) if cuda else None,
            "profiled_steps": steps}


def moe_graph_ms(model, impl: str, batch: int, layers: int, scope: str, device) -> float | None:
    """GPU time of one MoE part at the decode shape, replayed from a CUDA graph, times ``layers``. scope
    ``block``: the whole block (router included; hf_grouped_mm with ``batched_mm``, what generate decodes
    with); ``op``: our experts call alone (the compiled rows' scope). None on CPU."""
    if device.type != "cuda":
        return None
    from benchmarks.run import do_bench_ms

    block = moe_blocks(model)[0]
    H = model.config.hidden_size
    x = (torch.randn(batch, 1, H, device=device, generator=torch.Generator(device=device).manual_seed(7))).to(
        torch.bfloat16)
    switched = impl == "hf_grouped_mm"
    if switched:
        model.set_experts_implementation("batched_mm")
    try:
        with torch.no_grad():
            if scope == "op":
                x2 = x.reshape(batch, H)
                logits = getattr(block, block.router_attr)(x2)
                fn = lambda: block.experts(x2, logits)  # noqa: E731
            else:
                fn = lambda: block(x)  # noqa: E731
            return do_bench_ms(fn, graph=True) * layers
    finally:
        if switched:
            model.set_experts_implementation("grouped_mm")


# ------------------------------------------------------------------------------------------ rows
def run_row(model, impl: str, mode: str, batch: int, args, device, graphs: dict) -> dict:
    from torch._dynamo.utils import counters

    from torch_moe_ops.demo.measure import decode_rate, generation_setup, warm_up

    eager = mode == "eager"
    fullgraph = impl != "hf_eager"
    torch._dynamo.reset()
    counters.clear()
    generation_setup(model, compiled=not eager, backend=args.backend, fullgraph=fullgraph, dynamic=False,
                     mode="reduce-overhead" if mode == "graphs" else "default")
    g = torch.Generator().manual_seed(args.seed + batch)
    prompt = torch.randint(model.config.vocab_size, (batch, args.prompt), generator=g).to(device)
    row = {}
    with torch.no_grad():
        # compiled: the first call is the longest (it sizes the static cache) and compiles; eager: a short one
        first = min(4, args.new_tokens) if eager else args.new_tokens
        row["warmup_s" if eager else "compile_s"] = warm_up(model, prompt, first)
        frames = unique_graphs()
        _, step_s = decode_rate(model, prompt, args.new_tokens, args.repeats)
        row.update(tok_s=batch / step_s, step_ms=step_s * 1e3)
        if not eager:
            row.update(frames=frames, recompiles=unique_graphs() - frames, fullgraph=fullgraph)
        if mode == "graphs":  # the step replays CUDA graphs: no host time inside the MoE parts to split off
            row.update(moe_ms=None, moe_kernel_ms=None, moe_graph_ms=None,
                       moe_note="CUDA graphs (reduce-overhead): the host cost per op is not in the step")
        elif eager or impl.startswith("ours_"):
            row.update(profile_split(model, prompt, args.layers, eager, device.type == "cuda"))
            scope = "block" if eager else "op"
            key = (batch, scope)
            if impl == "hf_eager":  # its loop syncs (nonzero, a host loop over the hit experts): no capture
                graphs[key] = None
                row["moe_graph_error"] = "not capturable: the per-expert loop synchronizes with the host"
            if key not in graphs:
                try:
                    graphs[key] = moe_graph_ms(model, impl, batch, args.layers, scope, device)
                except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the block: no graph
                    graphs[key] = None
                    row["moe_graph_error"] = repr(exc)[:200]
            row["moe_graph_ms"] = graphs[key]
        else:
            row.update(moe_ms=None, moe_kernel_ms=None, moe_graph_ms=None,
                       moe_note="compiled transformers experts: Inductor fuses them, no boundary to time")
    if row.get("moe_ms") is not None:
        row["other_ms"] = row["step_ms"] - row["moe_ms"]
        if row.get("moe_graph_ms"):
            row["moe_vs_graph"] = row["moe_ms"] / row["moe_graph_ms"]
    if impl.startswith("hf_"):
        row["experts_implementation"] = model.config._experts_implementation
    return row


def plan(args) -> list:
    """[(batch, impl, [modes])]: batch by batch, impl by impl."""
    return [(b, impl, list(args.modes)) for b in args.batch for impl in args.impls]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --smoke or --device cpu)")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # transformers' version checks, traced
    log = Log()
    env = env_info(device)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(args.name)[0]
    write_env(args.out, env, "env.txt" if stem == "e2e" else f"env-{stem}.txt")  # a follow-up call: its own file
    path = os.path.join(args.out, args.name)
    config = qwen3_config(args.layers, args.smoke, args.prompt + args.new_tokens + 16)
    rows: list = []
    method = {"prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed,
              "backend": args.backend, "budget_s": args.budget_s, "transformers": transformers.__version__,
              "tok_s": "batch * (n - 1) / (t(P + n) - t(P + 1)), greedy generate, after warm-up",
              "compiled": "cache_implementation='static', CompileConfig(fullgraph=True (hf_eager: False), "
                          "dynamic=False, mode='default')",
              "config": {k: getattr(config, k) for k in (*FULL, "num_hidden_layers")}}
    flush = lambda: write_json(path, env, rows, method=method, smoke=args.smoke)  # noqa: E731
    log(f"e2e.py on {env['device']} (torch {env['torch']}, transformers {transformers.__version__}): {MODEL}-shaped, "
        f"{args.layers} layers, impls {','.join(args.impls)}, batch {args.batch}, modes {args.modes}; writing {path}")
    cost = dict(COST_GUESS)

    def over_budget(seconds: float) -> bool:
        return args.budget_s is not None and log.elapsed() + seconds > args.budget_s

    for batch, impl, modes in plan(args):
        scheme = impl[len("ours_"):] if impl.startswith("ours_") else "none"
        base = dict(model=MODEL, impl=impl, scheme=scheme, layers=args.layers, batch=batch)
        if over_budget(cost["build"] + min(cost[m] for m in modes)):
            rows += [dict(base, mode=m, error=f"skipped: time budget (--budget-s {args.budget_s})") for m in modes]
            log(f"{impl} batch {batch}: skipped (time budget)")
            flush()
            continue
        t0 = time.perf_counter()
        mem = (f"; GPU memory in use before: {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
               if device.type == "cuda" else "")
        try:
            model, wsum, report = build(impl, config, device, args.seed, args.smoke)
        except Exception as exc:  # noqa: BLE001
            free()
            rows += [dict(base, mode=m, error=f"build: {exc!r}"[:400]) for m in modes]
            log(f"{impl} batch {batch}: build FAILED {exc!r}"[:400])
            flush()
            continue
        cost["build"] = max(cost["build"], time.perf_counter() - t0)
        log(f"{impl} batch {batch}: built in {time.perf_counter() - t0:.1f} s"
            + (f" ({len(report.replaced)} blocks patched, {report.quant_scheme})" if report else "") + mem)
        graphs: dict = {}
        for mode in modes:
            row = dict(base, mode=mode, weights_sum=wsum)
            if over_budget(cost[mode]):
                row["error"] = f"skipped: time budget (--budget-s {args.budget_s})"
                rows.append(row)
                log(f"{impl} batch {batch} {mode}: skipped (time budget)")
                flush()
                continue
            t1 = time.perf_counter()
            try:
                row.update(run_row(model, impl, mode, batch, args, device, graphs))
            except Exception as exc:  # noqa: BLE001 - recorded; the other rows go on
                row["error"] = repr(exc)[:400]
                torch._dynamo.reset()
            row["row_s"] = time.perf_counter() - t1
            cost[mode] = max(cost[mode], row["row_s"]) if "error" not in row else cost[mode]
            rows.append(row)
            flush()
            if "error" in row:
                log(f"{impl} batch {batch} {mode}: FAILED {row['error']}")
                continue
            split = ""
            if row.get("moe_ms") is not None:
                mg = row.get("moe_graph_ms")
                split = (f"; MoE {row['moe_ms']:.2f} ms/step host" +
                         (f", kernels {row['moe_kernel_ms']:.2f}" if row.get("moe_kernel_ms") is not None else "") +
                         (f", CUDA graph {mg:.2f} ({row['moe_vs_graph']:.2f}x)" if mg else ""))
            extra = f", compile {row['compile_s']:.1f} s, frames {row['frames']}" if mode == "compiled" else ""
            log(f"{impl} batch {batch} {mode}: {row['tok_s']:.1f} tok/s, {row['step_ms']:.2f} ms/step{split}{extra}")
        del model
        free()
    flush()
    failed = sum("error" in r for r in rows)
    log(f"wrote {path}: {len(rows)} rows, {failed} failed or skipped")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for e2e.json and env.txt")
    p.add_argument("--name", default="e2e.json", help="the JSON's file name (a follow-up run: e2e-<what>.json, which "
                   "benchmarks.report_host merges)")
    p.add_argument("--impls", type=csv_arg(str, IMPLS), default=None, help=f"default {','.join(IMPLS)}")
    p.add_argument("--batch", type=csv_arg(int), default=None, help="default 1,8")
    p.add_argument("--modes", type=csv_arg(str, MODES), default=None,
                   help="default eager,compiled; graphs: CompileConfig(mode=\"reduce-overhead\"), CUDA graphs")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --smoke 2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; --smoke 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="n of the timing (default 64; --smoke 4)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed generate calls per length, the fastest taken (default 2: with 1, one slow call "
                        "decides a row)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip rows that would end past this many seconds from the start (default 480 on CUDA, "
                        "none on CPU; 0: no budget)")
    p.add_argument("--quick", action="store_true", help=f"batch 1, {','.join(QUICK_IMPLS)} (~3 minutes on an H100)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer tiny model on CPU (exercises the code)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --smoke aot_eager)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default cuda (--smoke: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: --smoke 1, else torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(impls=list(QUICK_IMPLS if args.quick else IMPLS), batch=[1] if args.quick else list(BATCHES),
                    modes=list(DEFAULT_MODES), layers=2 if smoke else 24, prompt=8 if smoke else 128,
                    new_tokens=4 if smoke else 64, backend="aot_eager" if smoke else "inductor",
                    device="cpu" if smoke else "cuda", threads=1 if smoke else None)
    if smoke:
        defaults["batch"] = [1, 2]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budget_s is None:
        args.budget_s = 480.0 if args.device == "cuda" else None
    elif args.budget_s == 0:
        args.budget_s = None
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the decode rate is a difference of two generate calls)")
    return args


if __name__ == "__main__":
    sys.exit(main())
