"""Under torch.compile with TORCH_MOE_OPS_COMPILE=triton the CUDA ops decompose into their Triton launches
(ops/decompose.py, docs/host-overhead.md), checked on this GPU-less machine: fused_moe traced on fake CUDA tensors through
AOTAutograd (tests/ops/trace_fake_cuda.py, in a subprocess without TRITON_INTERPRET). The graph must hold our
kernels and nothing that moves data (no copy of an input: torch's mutation analysis must see that no kernel
writes one), and a symbolic T must be guarded to its token bucket only. On the GPU, tests/ops/test_decompose_cuda.py
checks the compiled results bitwise against eager."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
CASES = [("none", 1, False), ("fp8_block", 24, True), ("fp8_channel", 3, False), ("int4_w4a16", 5000, True),
         ("none", 1, False, "opaque"), ("fp8_block", 24, True, "plans"), ("none", 3, False, "triton", True),
         ("none", 9, True), ("int4_w4a16", 5, True, "plans"), ("fp8_block", 1, False)]
#: Pipeline kernels per scheme (route [+ quantize x for fp8], align, GEMM1, activation [+ quantize], GEMM2, moe_sum).
KERNELS = {"none": 6, "fp8_block": 6, "fp8_channel": 6, "int4_w4a16": 6}
#: What may sit between the kernels: allocations, views, shape arithmetic.
FREE = {"aten.empty.memory_format", "aten.view.default", "aten.sym_size.int"}


def _trace(cases, **switches):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(switches, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.ops.trace_fake_cuda", json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.fixture(scope="module")
def traced():
    return _trace(CASES)


def test_the_unfused_kernels_at_T1_when_switched_off():
    """TORCH_MOE_OPS_FUSE_SUM=0 and TORCH_MOE_OPS_FUSE_ACTIVATION=0 at T = 1: moe_sum and the activation kernel
    are back, GEMM1 still routes (the fused defaults: test_graph_holds_our_kernels_and_nothing_that_moves_data,
    where GEMM1 writes the routing GEMM2 reads, and GEMM2 the counters GEMM1 cleared and the output, with no input
    copied)."""
    seen = _trace([("none", 1, False)], TORCH_MOE_OPS_FUSE_SUM="0", TORCH_MOE_OPS_FUSE_ACTIVATION="0")
    got = seen[("none", 1, False)]
    assert Counter(got["nodes"])["triton_kernel_wrapper_functional"] == KERNELS["none"] - 2, got
    assert got["cloned_inputs"] == []


def test_gemm1_prefetching_gemm2s_weights_copies_nothing():
    """TORCH_MOE_OPS_PREFETCH=1 at T = 1: GEMM1 also gets GEMM2's weights, which it only prefetches (a pure PTX
    asm whose zero result goes into a loop bound): torch's analysis must not take them as written, or Inductor
    would copy the weights every call; still two kernels."""
    got = _trace([("none", 1, False)], TORCH_MOE_OPS_PREFETCH="1")[("none", 1, False)]
    assert Counter(got["nodes"])["triton_kernel_wrapper_functional"] == KERNELS["none"] - 4, got
    assert got["cloned_inputs"] == [], got


def test_no_dependent_launch_under_inductor():
    """TORCH_MOE_OPS_PDL=1 at T = 1: Inductor's launches take no launch_pdl, so the traced GEMMs are the plain
    ones (gemm.dependent_launch is False while tracing): two kernels, no input copied."""
    got = _trace([("none", 1, False)], TORCH_MOE_OPS_PDL="1")[("none", 1, False)]
    assert Counter(got["nodes"])["triton_kernel_wrapper_functional"] == KERNELS["none"] - 4, got
    assert got["cloned_inputs"] == [], got


def test_gemm2_sums_aligned_rows_when_switched_on():
    """TORCH_MOE_OPS_FUSE_SUM=1 at T = 2..16 (symbolic): GEMM2 also sums the slots on aligned rows (routing with
    the alignment, GEMM1 with the activation, GEMM2: three kernels), reading the routing's ids and writing the
    counters GEMM1 cleared; no input copied."""
    got = _trace([("none", 9, True)], TORCH_MOE_OPS_FUSE_SUM="1")[("none", 9, True)]
    assert Counter(got["nodes"])["triton_kernel_wrapper_functional"] == KERNELS["none"] - 3, got
    assert "T <= 16" in got["guards"] and got["cloned_inputs"] == [], got


GRAPH_CASES = CASES[:4] + CASES[-1:]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[f"{c[0]}-T{c[1]}{'-symbolic' if c[2] else ''}" for c in GRAPH_CASES])
def test_graph_holds_our_kernels_and_nothing_that_moves_data(traced, case):
    seen = traced[case]
    ops = Counter(seen["nodes"])
    big = case[1] * 6 > 4096  # multi-kernel alignment (count + scan + scatter) past 4096 pairs
    # T = 1: no alignment (one pair a row block); T <= 16 (E = 60: 32 tokens a routing program, token buckets 1
    # and 16): the routing kernel's one program writes align_block_size's alignment
    aligned_in_routing = case[1] <= 16
    # T = 1: GEMM1 routes (fp8: and quantizes x) and applies the activation, GEMM2 (fp8: quantizes that and) sums
    # the slots (fp8_block: these tiles' K step is the group, gemm.quantizes_input); T <= 16: GEMM1 applies the
    # activation unless it is quantized (fp8)
    fused = 3 if case[1] == 1 else int(case[1] <= 16 and not case[0].startswith("fp8"))
    assert ops["triton_kernel_wrapper_functional"] == KERNELS[case[0]] + 2 * big - aligned_in_routing - fused, ops
    aten = {n for n in ops if n.startswith("aten.")}
    assert aten <= FREE, f"aten ops beyond allocations and views: {aten - FREE}"
    assert seen["cloned_inputs"] == [], "a kernel is taken to write a graph input: Inductor would copy it"


def test_kernels_get_only_the_tensors_they_read_or_write(traced):
    """An absent tensor goes to a kernel as None (a Triton constexpr), never as a stand-in tensor: Inductor's launch
    of a user kernel asks the driver for every tensor argument's pointer (docs/host-overhead.md). At T = 1 GEMM1
    routes (logits in; weights, ids and GEMM2's cleared counters out) and GEMM2 sums the slots."""
    gemm1 = ["a_ptr", "b_ptr", "c_ptr", "count_ptr", "ids_ptr", "logits_ptr", "topk_weights_ptr"]
    gemm2 = ["a_ptr", "b_ptr", "c_ptr", "count_ptr", "ids_ptr", "sum_ptr", "topk_weights_ptr"]
    assert traced[("none", 1, False)]["tensor_args"] == [gemm1, gemm2]
    scaled = [sorted(g + ["b_scale_ptr"]) for g in (gemm1, gemm2)]  # fp8_block: x quantized inside, no a_scale
    assert traced[("fp8_block", 1, False)]["tensor_args"] == scaled


def test_symbolic_T_is_guarded_to_its_token_bucket(traced):
    assert traced[("none", 1, False)]["guards"] == []
    guards = traced[("fp8_block", 24, True)]["guards"]
    assert "T > 16" in guards and "T <= 64" in guards, guards
    big = traced[("int4_w4a16", 5000, True)]["guards"]
    assert "T > 4096" in big and "T <= 16384" in big, big


def test_the_other_modes_call_one_op(traced):  # (an unbacked T too: tests/ops/test_decompose_cuda.py)
    assert traced[("none", 1, False, "opaque")]["nodes"] == ["moe.fused_moe.default"]
    plans = traced[("fp8_block", 24, True, "plans")]
    assert plans["nodes"] == ["moe._fused_moe_inference.default"]
    # the twin takes its tensors positionally and the rest in one string (Inductor passes no keyword then)
    twin = plans["twin"]
    assert twin["kwargs"] == [] and twin["n_args"] == 11, twin
    assert json.loads(twin["options"]) == dict(
        top_k=6, renormalize=True, scoring_func="softmax", num_expert_group=0, topk_group=0,
        routed_scaling_factor=1.0, activation="silu", quant_scheme="fp8_block", block_shape=None,
        apply_router_weight_on_input=False, activation_alpha=None, activation_limit=None, batch_invariant=False)
    int4 = traced[("int4_w4a16", 5, True, "plans")]  # a list through the string; T symbolic
    assert json.loads(int4["twin"]["options"])["block_shape"] == [1, 128], int4
    assert int4["guards"] == ["6*T <= 2147483647"], int4  # the pair count's int32 bound, no token bucket
    assert "T > 16" not in plans["guards"] and "T <= 64" not in plans["guards"]  # one graph for every T


def test_a_symbolic_T_in_the_routing_programs_bucket_aligns_in_routing(traced):
    """T = 2..16 symbolic (E = 60: one routing program holds 32 tokens): the routing kernel aligns and GEMM1
    applies the activation, guarded to the bucket only, and no input is copied (the shared alignment body's stores
    are analyzed through its call)."""
    seen = traced[("none", 9, True)]
    assert Counter(seen["nodes"])["triton_kernel_wrapper_functional"] == KERNELS["none"] - 2, seen["nodes"]
    assert "T <= 16" in seen["guards"] and seen["cloned_inputs"] == [], seen


def test_a_tensor_subclass_handles_the_op_first(traced):
    """A subclass input (torch's TwoTensor, which runs each op on its two halves) is unwrapped before the rule
    sees FunctionalTensors: twice the kernels, no error (the rule must not claim subclass calls)."""
    ops = Counter(traced[("none", 3, False, "triton", True)]["nodes"])
    assert ops["triton_kernel_wrapper_functional"] == 2 * (KERNELS["none"] - 2), ops  # T = 3: aligned, activated



_EMBED = """
import ast, importlib, json, pkgutil
import torch_moe_ops._kernels as kernels
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure
from triton.runtime.jit import JITFunction
done, bad = [], []
for info in pkgutil.iter_modules(kernels.__path__):
    module = importlib.import_module(kernels.__name__ + "." + info.name)
    for name, fn in vars(module).items():
        if isinstance(fn, JITFunction) and name.endswith("_kernel") and fn.__module__ == module.__name__:
            src = closure(fn)
            try:
                call = ast.parse("async_compile.triton(" + repr(name) + ", " + chr(39) * 3 + chr(10) + src + chr(10)
                                 + chr(39) * 3 + ")").body[0].value
                assert call.args[1].value.strip() == src.strip()
                ast.parse(src)
            except (SyntaxError, AssertionError) as exc:
                bad.append(name + ": " + str(exc))
            done.append(name)
print(json.dumps([done, bad]))
"""


def test_inductor_can_embed_every_kernel_source():
    """In ``triton`` mode Inductor writes each kernel's source with its helpers and global constexprs (their
    repr) into a triple-quoted string of the code it generates; a constexpr string holding a newline broke that
    literal on the H100 (2026-12-07: the PTX decode's strings). Every kernel of the package must survive the
    round trip (run without TRITON_INTERPRET, whose kernels have no source to embed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _EMBED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) >= 10 and bad == [], (done, bad)
