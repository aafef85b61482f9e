"""GPU-only (``pytest -m cuda``): the Triton backward on CUDA against the CPU reference backward at model-like
shapes, no host synchronization in fwd + bwd, and CUDA-graph capture / replay of fwd + bwd.

Tolerances (``assert_grad_close``): bf16 2e-2 (test_backward.py: the Triton path rounds c1, GEMM2's
input and dc1 to bf16, the reference keeps fp32); fp8 / int weight schemes 3e-2 (those rounded values are
re-quantized to fp8, so a few activation codes differ by one step); fp32 1e-4 (fp32 dots on the GPU with
``input_precision="ieee"``, sums over up to 2880 terms in a different order)."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops import testing

from tests.grad_oracle import assert_grad_close

pytestmark = pytest.mark.cuda
DEV = "cuda"
NAMES = ("x", "w13", "w2", "b13", "b2", "logits")


def _case(T, E, k, H, I, scheme="none", activation="silu", dtype=torch.bfloat16, bias=False, seed=0):
    torch.manual_seed(seed)
    gated = not activation.endswith("_no_mul")
    w13, w2, b13, b2 = testing.random_moe_weights(E, H, I, gated=gated, dtype=torch.float32, bias=True)
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, activation)
    kw = dict(activation=activation, **testing.experts_kwargs(scheme, s13, s2, block))
    if scheme == "none":
        q13, q2 = q13.to(dtype), q2.to(dtype)
    leaves = dict(x=(torch.randn(T, H) / 2).to(dtype), w13=q13, w2=q2, logits=torch.randn(T, E))
    if bias:
        leaves.update(b13=b13.to(dtype), b2=b2.to(dtype))
    return leaves, kw, (torch.randn(T, H) / 10).to(dtype)


def _grads(leaves, kw, g, k, device, names):
    t = {n: v.to(device) for n, v in leaves.items()}
    for n in names:
        t[n] = t[n].detach().requires_grad_()
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    out = torch_moe_ops.fused_moe(t["x"], t["logits"], t["w13"], t["w2"], k, w13_bias=t.get("b13"),
                                  w2_bias=t.get("b2"), **kw)
    return dict(zip(names, torch.autograd.grad(out, [t[n] for n in names], g.to(device))))


CASES = [
    pytest.param(1, 8, 2, 136, 88, "none", "silu", torch.bfloat16, False, id="T1-E8-none"),
    pytest.param(33, 60, 6, 136, 88, "none", "gelu", torch.bfloat16, True, id="T33-E60-gelu-bias"),
    pytest.param(257, 32, 8, 2048, 768, "none", "silu", torch.bfloat16, False, id="T257-qwen3-like-E32"),
    pytest.param(64, 8, 4, 2880, 2880, "none", "swigluoai", torch.bfloat16, True, id="T64-gptoss-like-E8"),
    pytest.param(100, 16, 2, 256, 128, "none", "relu2_no_mul", torch.float32, True, id="T100-fp32-relu2_no_mul"),
] + [pytest.param(257, 60, 6, 512, 384, s, "silu", torch.bfloat16, True, id=f"T257-E60-{s}")
     for s in ("fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16")]


@pytest.mark.parametrize("T,E,k,H,I,scheme,activation,dtype,bias", CASES)
def test_triton_backward_vs_reference(T, E, k, H, I, scheme, activation, dtype, bias):
    leaves, kw, g = _case(T, E, k, H, I, scheme, activation, dtype, bias)
    names = [n for n in NAMES if n in leaves and (scheme == "none" or n not in ("w13", "w2"))]
    got = _grads(leaves, kw, g, k, DEV, names)
    want = _grads(leaves, kw, g, k, "cpu", names)
    tol = 1e-4 if dtype == torch.float32 else 2e-2 if scheme == "none" else 3e-2
    for n in names:
        assert got[n].dtype == want[n].dtype and torch.isfinite(got[n]).all(), n
        assert_grad_close(want[n], got[n].cpu(), tol, n)


def test_no_host_sync_in_forward_and_backward():
    leaves, kw, g = _case(77, 16, 4, 256, 128, "fp8_block", "silu", torch.bfloat16, True)
    t = {n: v.to(DEV).requires_grad_(n in ("x", "logits", "b13")) for n, v in leaves.items()}
    kw = {n: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    gd = g.to(DEV)
    for _ in range(2):  # the first call compiles the kernels (may synchronize); the second must not
        torch.cuda.set_sync_debug_mode("error" if _ else "default")
        try:
            out = torch_moe_ops.fused_moe(t["x"], t["logits"], t["w13"], t["w2"], 4, w13_bias=t["b13"],
                                          w2_bias=t["b2"], **kw)
            torch.autograd.grad(out, [t["x"], t["logits"], t["b13"]], gd)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("saving", [False, True], ids=["recompute", "saving"])
@pytest.mark.parametrize("scheme", ["none", "fp8_channel"])
def test_cuda_graph_capture_fwd_bwd(scheme, saving):
    """Capture fwd + bwd once, replay on new inputs copied into the static tensors: the gradients equal eager."""
    T, E, k, H, I = 48, 16, 4, 256, 128
    leaves, kw, _ = _case(T, E, k, H, I, scheme, "silu", torch.bfloat16, True)
    kw = {n: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    w13, w2, b13, b2 = (leaves[n].to(DEV) for n in ("w13", "w2", "b13", "b2"))
    params = [b13.requires_grad_(), b2.requires_grad_()]
    if scheme == "none":
        params += [w13.requires_grad_(), w2.requires_grad_()]
    static_x = torch.zeros(T, H, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    static_logits = torch.zeros(T, E, device=DEV, requires_grad=True)
    static_g = torch.zeros(T, H, dtype=torch.bfloat16, device=DEV)

    def step(x, logits, g):
        if saving:
            w, ids = torch_moe_ops.topk_route(logits, k)
            out = torch.ops.moe._fused_experts_train(x, w13, w2, w, ids, "silu", kw.get("quant_scheme", "none"),
                                                     kw.get("w13_scale"), kw.get("w2_scale"), b13, b2)[0]
        else:
            out = torch_moe_ops.fused_moe(x, logits, w13, w2, k, w13_bias=b13, w2_bias=b2, **kw)
        return (out, *torch.autograd.grad(out, [x, logits, *params], g))

    def fill(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            static_x.copy_(torch.randn(T, H, device=DEV) / 2)
            static_logits.copy_(torch.randn(T, E, device=DEV))
            static_g.copy_(torch.randn(T, H, device=DEV) / 10)

    fill(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels compiled and autotuned outside the capture
        for _ in range(3):
            step(static_x, static_logits, static_g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x, static_logits, static_g)
    for seed in (2, 3):
        fill(seed)
        graph.replay()
        want = step(static_x.detach().clone().requires_grad_(), static_logits.detach().clone().requires_grad_(),
                    static_g.clone())
        torch.cuda.synchronize()
        for got, ref in zip(static_out, want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
