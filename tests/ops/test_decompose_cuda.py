"""What compiled graphs call for the CUDA ops (ops/decompose.py, docs/host-overhead.md). TORCH_MOE_OPS_COMPILE=plans
(default): the lean inference op, one graph for every T, bitwise eager. =triton: the graph launches our Triton
kernels itself, bitwise eager (same kernels, same tiles per token bucket), copies nothing, retraces once per
bucket. Both CUDA-graph capturable; a training graph gets the public op's gradients."""
from __future__ import annotations

import re

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import testing
from torch_moe_ops._platform import COMPILE_ENV
from torch_moe_ops.ops.fused_moe import PLANS

pytestmark = pytest.mark.cuda
DEV = "cuda"
E, K, H, I = 60, 6, 512, 384  # E not a power of two, k = 6


def _weights(scheme, seed=0):
    torch.manual_seed(seed)
    w13, w2, _, _ = testing.random_moe_weights(E, H, I, dtype=torch.bfloat16, device=DEV)
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, "silu", None)
    return q13, q2, testing.experts_kwargs(scheme, s13, s2, block)


def _inputs(T, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(T, H, device=DEV, generator=g) * 0.1).bfloat16(), torch.randn(T, E, device=DEV, generator=g)


def _frames():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _recompiles():
    """Why Dynamo recompiled, for the failure messages (a frame count once came out one higher on an H100)."""
    from torch._dynamo.utils import guard_failures

    return {getattr(code, "co_name", str(code)): reasons for code, reasons in guard_failures.items()}


@pytest.mark.parametrize("scheme", ["none", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16"])
def test_triton_mode_equals_eager_and_retraces_per_bucket(scheme, fresh_dynamo, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "triton")
    q13, q2, kw = _weights(scheme)
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw) * 2, fullgraph=True, dynamic=True)
    PLANS.clear()
    graphs = []
    for T in (1, 5, 7, 24, 17, 6):  # buckets 1, 16, 16, 64, 64, 16
        x, logits = _inputs(T, T)
        got = f(x, logits)
        want = moe.fused_moe(x, logits, q13, q2, K, **kw) * 2
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"T={T}")
        graphs.append(_frames())
    assert graphs == [1, 2, 2, 3, 3, 3], (graphs, _recompiles())  # T=1 static, then one graph per bucket


@pytest.mark.parametrize("scheme", ["none", "fp8_block"])
def test_triton_mode_under_inductors_static_launcher_equals_eager(scheme, fresh_dynamo, monkeypatch):
    """Inductor's static launcher for user-defined Triton kernels (``static_launch_user_defined_triton_kernels``,
    off by default in torch; TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1): our kernels launched from
    C++ instead of Triton's Python launcher (docs/host-overhead.md), or, where it cannot, the usual way: bitwise
    eager at T = 1 (two kernels), 9 and 300."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv(COMPILE_ENV, "triton")
    q13, q2, kw = _weights(scheme)
    with inductor_config.patch(static_launch_user_defined_triton_kernels=True):
        f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw), fullgraph=True, dynamic=True)
        for T in (1, 9, 300):
            x, logits = _inputs(T, T)
            want = moe.fused_moe(x, logits, q13, q2, K, **kw)
            torch.testing.assert_close(f(x, logits), want, rtol=0, atol=0, msg=f"T={T}")


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "int4_w4a16"])
def test_plans_mode_equals_eager_with_one_graph(scheme, fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    q13, q2, kw = _weights(scheme)
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw) * 2, fullgraph=True, dynamic=True)
    for T in (1, 5, 300, 24, 5):
        x, logits = _inputs(T, T)
        got = f(x, logits)
        torch.testing.assert_close(got, moe.fused_moe(x, logits, q13, q2, K, **kw) * 2, rtol=0, atol=0, msg=f"T={T}")
    assert _frames() == 2, _recompiles()  # T = 1 (specialized by PyTorch) and every T >= 2
    _, codes = run_and_get_code(torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw)), x, logits)
    calls = [ln for ln in "\n".join(codes).splitlines() if "torch.ops.moe._fused_moe_inference.default(" in ln]
    assert calls and all("=" not in ln.split("default(", 1)[1] for ln in calls), calls  # no keyword: the twin's schema


def test_generated_code_launches_our_kernels_and_copies_nothing(fresh_dynamo, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv(COMPILE_ENV, "triton")
    q13, q2, kw = _weights("fp8_block")
    x, logits = _inputs(1, 0)
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw), fullgraph=True)
    _, codes = run_and_get_code(f, x, logits)
    code = "\n".join(codes)
    launched = set(re.findall(r"(_[a-z0-9_]+_kernel)", code))
    # T = 1 (docs/kernels.md, "Two launches at T = 1"): GEMM1 routes, quantizes x where its K step is the fp8
    # group (else the routing kernel quantizes it) and applies the activation; GEMM2 quantizes that where its K
    # step is the group (else act_and_quant does) and sums the slots; no alignment
    from torch_moe_ops._kernels.configs import get_config
    from torch_moe_ops._kernels.gemm import quantizes_input
    from torch_moe_ops.schemes import get_quant_scheme

    sch, block = get_quant_scheme("fp8_block"), kw["block_shape"]
    cfg1 = get_config(1, E, 2 * I, H, sch, block, x.device, top_k=K, dtype=x.dtype)
    cfg2 = get_config(1, E, H, I, sch, block, x.device, top_k=K, dtype=x.dtype, block_m=cfg1.block_m)
    routed = {"_topk_route_kernel"} if not quantizes_input(sch, block, cfg1) else set()
    quant = {"_act_quant_kernel"} if not quantizes_input(sch, block, cfg2) else set()
    assert launched == {"_moe_gemm_kernel"} | routed | quant, launched
    assert "torch.ops.moe" not in code, "the op stayed opaque"
    assert not re.search(r"\bclone\b|copy_\(|aten\.copy", code), "Inductor copies a buffer our kernels write"


def test_opaque_switch_keeps_the_op_and_its_plans(monkeypatch, fresh_dynamo):
    monkeypatch.setenv(COMPILE_ENV, "opaque")
    q13, q2, kw = _weights("none")
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw), fullgraph=True, dynamic=True)
    PLANS.clear()
    for T in (3, 3):
        x, logits = _inputs(T, T)
        torch.testing.assert_close(f(x, logits), moe.fused_moe(x, logits, q13, q2, K, **kw), rtol=0, atol=0)
    assert any(p is not None for p in PLANS.plans.values())


@pytest.mark.parametrize("mode", ["plans", "triton"])
def test_an_unbacked_T_keeps_one_graph(mode, fresh_dynamo, monkeypatch):
    """mark_unbacked (README): one graph for every T (triton: no value to pick tiles by, the op stays whole)."""
    monkeypatch.setenv(COMPILE_ENV, mode)
    q13, q2, kw = _weights("none")
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw), fullgraph=True, dynamic=True)
    for T in (5, 40, 300):
        x, logits = _inputs(T, T)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        torch._dynamo.decorators.mark_unbacked(logits, 0)
        torch.testing.assert_close(f(x, logits), moe.fused_moe(x, logits, q13, q2, K, **kw), rtol=0, atol=0)
    assert _frames() == 1


@pytest.mark.parametrize("mode", ["plans", "triton"])
def test_cuda_graph_of_the_compiled_graph(mode, fresh_dynamo, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv(COMPILE_ENV, mode)
    q13, q2, kw = _weights("fp8_block")
    f = torch.compile(lambda x, r: moe.fused_moe(x, r, q13, q2, K, **kw) + 1, mode="reduce-overhead", fullgraph=True)
    x, logits = _inputs(4, 0)
    for _ in range(3):
        got = f(x, logits)
    torch.testing.assert_close(got, moe.fused_moe(x, logits, q13, q2, K, **kw) + 1, rtol=0, atol=0)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])


@pytest.mark.parametrize("mode", ["plans", "triton"])
def test_training_graph_matches_eager_gradients(mode, fresh_dynamo, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, mode)
    torch.manual_seed(0)
    w13, w2, _, _ = testing.random_moe_weights(E, H, I, dtype=torch.bfloat16, device=DEV)
    w13.requires_grad_(True)
    x, logits = _inputs(9, 0)

    def step(x, logits):
        return (moe.fused_moe(x, logits, w13, w2, K).float() ** 2).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xx, ll = x.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        fn(xx, ll).backward()
        grads.append((xx.grad, ll.grad, w13.grad.clone()))
        w13.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
