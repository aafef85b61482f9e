"""Where a planned MoE call's host time goes: ``python -m benchmarks.host_profile [--out DIR]``.

Splits the host time of one ``torch.ops.moe.fused_moe`` call (Qwen3-30B-A3B layer shape, bf16 and fp8_block,
T = 1 and 256, launch plans replaying; docs/host-overhead.md) into: the dispatcher (a ``custom_op`` with the
same schema and an empty kernel, against a plain ``torch.library.Library`` kernel with and without autograd),
the plan key, the two allocations, and each replayed launch (timed one by one); plus a cProfile of 200 calls.
Then the compiled call (``torch.compile(fullgraph=True, dynamic=True)``) in each compile mode (``plans``,
``triton``; docs/host-overhead.md): host time per call, a cProfile of 200 calls and the wrapper code Inductor
generated (``compiled_<mode>_<scheme>_T<T>.py`` beside the JSON), against the floor of a compiled ``x * 2``.
Host figures come from ``time.perf_counter`` around unsynchronized calls (the GPU queue never fills: few calls
per run). On CPU (``--smoke``) only the dispatcher floors run: the plans need CUDA.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import time
import traceback

import torch

import torch_moe_ops as moe
from torch_moe_ops import testing
from torch_moe_ops._platform import getenv
from torch_moe_ops.ops.fused_moe import FUSED_MOE, MOE_SCHEMA, PLANS, _sig

E, K, H, I = 128, 8, 2048, 768
SMALL = (8, 2, 64, 32)  # (E, k, H, I) of runs that time only the Python or only exercise the code


def per_call_us(fn, calls=50, repeats=9, sync=lambda: None) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
        sync()
    return statistics.median(times) * 1e6


def dispatcher_floors(device: str) -> dict:
    """Host time of an op with fused_moe's schema whose kernel only returns a preallocated tensor."""
    out = torch.empty(1, H, device=device)

    def kernel(*args, **kwargs):
        return out

    lib = torch.library.Library("moe_profile", "DEF")
    for name in ("plain", "autograd"):
        lib.define(name + MOE_SCHEMA)
        lib.impl(name, kernel, "CUDA" if device == "cuda" else "CPU")
    torch.library.register_autograd("moe_profile::autograd", lambda ctx, g: (g,) + (None,) * 18)
    custom = torch.library.custom_op("moe_profile::custom", mutates_args=(), schema=MOE_SCHEMA,
                                     device_types=device)(lambda *a, **k: out.clone())
    torch.library.register_autograd("moe_profile::custom", lambda ctx, g: (g,) + (None,) * 18)
    x = torch.randn(1, H, device=device)
    logits = torch.randn(1, E, device=device)
    w = torch.empty(E, 2, 2, device=device)
    ops = torch.ops.moe_profile
    row = {}
    with torch.no_grad():
        row["library_us"] = per_call_us(lambda: ops.plain(x, logits, w, w, K))
        row["library_autograd_us"] = per_call_us(lambda: ops.autograd(x, logits, w, w, K))
        row["custom_op_us"] = per_call_us(lambda: ops.custom(x, logits, w, w, K))
        row["clone_us"] = per_call_us(lambda: out.clone())
    ins = [x, logits, w, w, None, None, None, None, None, None]
    row["sig_10_inputs_us"] = per_call_us(lambda: tuple(map(_sig, ins)))
    row["env_reads_us"] = per_call_us(lambda: (os.environ.get("TORCH_MOE_OPS_DEBUG", "0"),
                                               os.environ.get("TORCH_MOE_OPS_LAUNCH_PLANS", "1")))
    row["getenv_reads_us"] = per_call_us(lambda: (getenv("TORCH_MOE_OPS_DEBUG", "0"),
                                                  getenv("TORCH_MOE_OPS_LAUNCH_PLANS", "1")))  # _platform.getenv
    row.update(compiled_schema_floors(device))
    row["layer_python_us"], row["hf_block_python_us"] = python_above_the_op(device)
    return row


def python_above_the_op(device: str, dims=SMALL) -> tuple[float, float | None]:
    """Host µs a T = 1 call spends above the op (sizes do not matter; small ones here): ``FusedMoE.forward``
    (bf16), and the transformers block that ``patch`` makes of a Qwen3-MoE layer (its router, hooks, the layer;
    None without transformers), each with the op's kernel replaced by one returning a preallocated tensor (the
    public function's direct call, patched for the measurement): what is timed is their Python and the public
    wrapper."""
    from torch_moe_ops.layer import FusedMoE

    e, k, h, i = dims
    layer = FusedMoE(e, k, h, i, params_dtype=torch.bfloat16, device=device)
    w13, w2, _, _ = testing.random_moe_weights(e, h, i, dtype=torch.bfloat16, device=device)
    layer.load_weights(w13, w2)
    x = torch.randn(1, h, device=device, dtype=torch.bfloat16)
    logits = torch.randn(1, e, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    env = moe.fused_moe.__globals__  # the generated wrapper's names (ops/signature.py)
    saved = {n: env[n] for n in ("_direct_ok", "_cuda")}
    env.update(_direct_ok=lambda *t: True, _cuda=lambda a: out)
    try:
        with torch.no_grad():
            layer_us = per_call_us(lambda: layer(x, logits), calls=500)
            block = _hf_block(dims, device)
            block_us = None if block is None else per_call_us(lambda: block(x[None]), calls=500)
        return layer_us, block_us
    finally:
        env.update(saved)


def _hf_block(dims, device):
    """The patched MoE block of a one-layer Qwen3-MoE with these dims (bf16), or None without transformers."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    from torch_moe_ops.integrations.transformers import patch
    from torch_moe_ops.integrations.transformers.block import MoEBlock

    e, k, h, i = dims
    config = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=h, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=h // 4, intermediate_size=2 * i,
                                  moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    patch(model)
    return next(m for m in model.modules() if isinstance(m, MoEBlock))


def compiled_schema_floors(device: str, layers: int = 4) -> dict:
    """What the lean twin's schema saves in a compiled graph (docs/host-overhead.md, "The lean op's schema"): a
    compiled stack of ``layers`` × (op + residual add) whose op, a plain ``Library`` op with an empty kernel, has
    the public schema (Inductor passes its ~19 arguments with defaults by keyword) or the twin's (tensors
    positional, one options string); µs per op = (stack − the stack with ``x * 2`` for the op) / ``layers``."""
    lib = torch.library.Library("moe_schema_floor", "DEF")
    for name, schema in (("public", MOE_SCHEMA), ("twin", FUSED_MOE.inference_schema)):
        lib.define(name + schema)
        lib.impl(name, lambda x, *a, **k: torch.empty_like(x), "CUDA" if device == "cuda" else "CPU")
        torch.library.register_fake(f"moe_schema_floor::{name}", lambda x, *a, **k: torch.empty_like(x), lib=lib)
    x = torch.randn(1, H, device=device)
    logits = torch.randn(1, E, device=device)
    w = torch.empty(E, 2, 2, device=device)
    a = op_args(x, logits, w, w, {})
    ops = torch.ops.moe_schema_floor
    n = len(FUSED_MOE.positional)
    twin = FUSED_MOE.inference_args(a)  # (made while tracing, in the package)
    public = lambda op, a: op(*a[:n], **dict(zip(FUSED_MOE.keyword_only, a[n:])))  # noqa: E731
    bodies = {"x2": lambda x, r: x * 2,
              "public": lambda x, r: public(ops.public, a._replace(hidden_states=x, router_logits=r)),
              "twin": lambda x, r: ops.twin(x, r, *twin[2:])}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    compiled, times = {}, {name: [] for name in bodies}
    torch._dynamo.reset()
    with torch.no_grad():
        for name, body in bodies.items():
            def stack(x, r, body=body):
                for _ in range(layers):
                    x = body(x, r) + x
                return x

            compiled[name] = torch.compile(stack, fullgraph=True, dynamic=True)
            compiled[name](x, logits)
        for _ in range(15):  # interleaved rounds, a new order each: the host's drift hits every variant alike
            for name in random.sample(list(bodies), len(bodies)):
                times[name].append(per_call_us(lambda: compiled[name](x, logits), repeats=1, sync=sync))
    stack_us = {name: statistics.median(t) for name, t in times.items()}
    torch._dynamo.reset()
    return {f"compiled_{n}_schema_op_us": (stack_us[n] - stack_us["x2"]) / layers for n in ("public", "twin")}


def op_args(x, logits, w13, w2, kw: dict):
    """``FUSED_MOE.Args`` of a call, the schema's defaults for what ``kw`` leaves out (a hand-written list of them
    went stale when the op gained ``batch_invariant``; on the H100 of 2026-12-07 nothing after the floors came
    back, which this explains)."""
    defaults = {arg.name: arg.value for arg in FUSED_MOE.args if arg.default is not None}
    return FUSED_MOE.Args(hidden_states=x, router_logits=logits, w13=w13, w2=w2, top_k=K, **{**defaults, **kw})


def replay_split(scheme: str, T: int) -> dict:
    """The planned call piece by piece (CUDA)."""
    torch.manual_seed(0)
    w13, w2, _, _ = testing.random_moe_weights(E, H, I, dtype=torch.bfloat16, device="cuda")
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, "silu", None)
    kw = testing.experts_kwargs(scheme, s13, s2, block)
    x = (torch.randn(T, H, device="cuda") * 0.1).bfloat16()
    logits = torch.randn(T, E, device="cuda")
    call = lambda: moe.fused_moe(x, logits, q13, q2, K, **kw)  # noqa: E731
    PLANS.clear()
    call()
    (key, plan), = PLANS.plans.items()
    row = {"scheme": scheme, "T": T, "planned": plan is not None}
    if plan is None:
        return row
    sync = torch.cuda.synchronize
    a = op_args(x, logits, q13, q2, kw)
    plan_key = FUSED_MOE.plan_key(_sig, torch._C._cuda_getDevice)
    _, inputs = plan_key(a)
    with torch.no_grad():
        row["call_us"] = per_call_us(call, sync=sync)
        row["op_us"] = per_call_us(lambda: torch.ops.moe.fused_moe.default(x, logits, q13, q2, K, **kw), sync=sync)
        row["key_us"] = per_call_us(lambda: plan_key(a), sync=sync)
        row["replay_us"] = per_call_us(lambda: plan.replay(inputs), sync=sync)
        row["workspace_alloc_us"] = per_call_us(
            lambda: torch.empty(plan.workspace_bytes, dtype=torch.uint8, device="cuda"), sync=sync)
    row["launches"] = len(plan.launches)
    row["workspace_kib"] = plan.workspace_bytes / 1024
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    outs, ptrs, ws = plan.bind(inputs)  # the buffers of one real replay: each launch finds what it reads
    per_launch = []
    for ln in plan.launches:
        args = ln.args.copy()
        for pos, base, off in ln.slots:
            args[pos] = ptrs[base] + off
        g0, g1, g2 = ln.grid
        per_launch.append(round(per_call_us(lambda: ln.call(g0, g1, g2, stream, ln.function, *args), sync=sync), 2))
    row["per_launch_us"] = per_launch
    prof = cProfile.Profile()
    with torch.no_grad():
        sync()
        prof.enable()
        for _ in range(200):
            call()
        prof.disable()
        sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
    row["cprofile_top"] = text.getvalue()[-4000:]
    return row


def _profile_top(fn, calls: int = 200, lines: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()[-4000:]


def compiled_split(scheme: str, T: int, mode: str, device: str, dims=(E, K, H, I)) -> dict:
    """One compiled ``fused_moe`` call under ``TORCH_MOE_OPS_COMPILE=mode``: host µs per call, the cProfile of
    200 calls, Inductor's generated code (key ``code``), and a compiled ``x * 2``'s host µs (the floor of any
    compiled call on this host: guards, graph entry, one launch)."""
    from torch._inductor.utils import run_and_get_code

    from torch_moe_ops._platform import COMPILE_ENV

    e, k, h, i = dims
    torch.manual_seed(0)
    w13, w2, _, _ = testing.random_moe_weights(e, h, i, dtype=torch.bfloat16, device=device)
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, "silu", None)
    kw = testing.experts_kwargs(scheme, s13, s2, block)
    x = (torch.randn(T, h, device=device) * 0.1).bfloat16()
    logits = torch.randn(T, e, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    before = os.environ.get(COMPILE_ENV)
    os.environ[COMPILE_ENV] = mode  # read when the graph is traced
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, k, **kw), fullgraph=True, dynamic=True)
        g = torch.compile(lambda x: x * 2, fullgraph=True, dynamic=True)
        with torch.no_grad():
            _, codes = run_and_get_code(f, x, logits)
            row = {"mode": mode, "scheme": scheme, "T": T,
                   "compiled_us": per_call_us(lambda: f(x, logits), sync=sync),
                   "compiled_x2_us": per_call_us(lambda: g(x), sync=sync),
                   "eager_public_us": per_call_us(lambda: moe.fused_moe(x, logits, q13, q2, k, **kw), sync=sync)}
            sync()
            row["cprofile_top"] = _profile_top(lambda: f(x, logits))
            sync()
        row["code"] = "\n".join(codes)
    finally:
        if before is None:
            os.environ.pop(COMPILE_ENV, None)
        else:
            os.environ[COMPILE_ENV] = before
        torch._dynamo.reset()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for host_profile.json")
    p.add_argument("--smoke", action="store_true", help="CPU: the dispatcher floors only")
    args = p.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    rows, codes = [], {}
    if device == "cuda":
        for scheme in ("none", "fp8_block"):
            for T in (1, 256):
                rows.append(replay_split(scheme, T))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "cprofile_top"}), flush=True)
                print(rows[-1].get("cprofile_top", ""), flush=True)
        cases = [(m, s, T) for m in ("plans", "triton") for s in ("none", "fp8_block") for T in (1, 256)]
    else:  # the compiled split's code path on a small layer (every mode is the public op on CPU)
        cases = [("plans", "none", 3)]
        w = torch.empty(E, 2, 2)
        op_args(torch.empty(1, H), torch.empty(1, E), w, w, {})  # replay_split's arguments (CUDA-only otherwise)
    for mode, scheme, T in cases:
        try:
            row = compiled_split(scheme, T, mode, device, (E, K, H, I) if device == "cuda" else SMALL)
        except Exception as exc:  # noqa: BLE001 - one failed mode must not lose the rest of the profile
            row = {"mode": mode, "scheme": scheme, "T": T, "error": repr(exc)[:500],
                   "traceback": traceback.format_exc()[-3000:]}
        codes[f"compiled_{mode}_{scheme}_T{T}.py"] = row.pop("code", "")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "cprofile_top"}), flush=True)
        print(row.get("cprofile_top", ""), flush=True)
    # The dispatcher floors last: they register ops of their own (moe_profile::*), and on the H100 of session 17
    # (torch 2.11) every compiled split that ran after them failed with "'CustomDecompTable' object is not a mapping"
    rows.append({"floors": device, **dispatcher_floors(device)})
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, code in codes.items():
            with open(os.path.join(args.out, name), "w") as f:
                f.write(code)
        with open(os.path.join(args.out, "host_profile.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
