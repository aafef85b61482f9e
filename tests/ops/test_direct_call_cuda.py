"""The public functions call the CUDA kernel without the dispatcher when the dispatcher would do nothing else
(ops/_registry.direct_call_ok, docs/host-overhead.md): same result bitwise; autograd, tensor subclasses, modes
and the profiler still go through the dispatcher."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import testing

pytestmark = pytest.mark.cuda
E, K, H, I = 16, 4, 256, 128


@pytest.fixture
def counted(monkeypatch):
    """Count the direct calls of moe.fused_moe's CUDA kernel."""
    calls = []
    ns = moe.fused_moe.__globals__
    inner = ns["_cuda"]
    monkeypatch.setitem(ns, "_cuda", lambda a: calls.append(1) or inner(a))
    return calls


def _case(requires_grad=False):
    torch.manual_seed(0)
    w13, w2, _, _ = testing.random_moe_weights(E, H, I, dtype=torch.bfloat16, device="cuda")
    x = (torch.randn(5, H, device="cuda") * 0.1).bfloat16().requires_grad_(requires_grad)
    return x, torch.randn(5, E, device="cuda"), w13, w2


def test_direct_call_equals_the_dispatched_op(counted):
    x, logits, w13, w2 = _case()
    got = moe.fused_moe(x, logits, w13, w2, K)
    assert counted == [1]
    torch.testing.assert_close(got, torch.ops.moe.fused_moe(x, logits, w13, w2, K), rtol=0, atol=0)


def test_autograd_modes_and_profiler_take_the_dispatcher(counted):
    x, logits, w13, w2 = _case(requires_grad=True)
    out = moe.fused_moe(x, logits, w13, w2, K)
    assert out.grad_fn is not None and counted == []
    with torch.no_grad():
        moe.fused_moe(x, logits, w13, w2, K)
    assert counted == [1]  # no gradient to record: direct
    with torch.no_grad(), torch.device("cuda"):  # a TorchFunctionMode
        moe.fused_moe(x, logits, w13, w2, K)
    with torch.no_grad(), torch.profiler.profile() as prof:
        moe.fused_moe(x, logits, w13, w2, K)
    assert counted == [1]
    assert any("moe::fused_moe" in e.name for e in prof.events())
    with torch.no_grad():  # torch.jit.trace records through the dispatcher
        traced = torch.jit.trace(lambda x, r: moe.fused_moe(x, r, w13, w2, K), (x.detach(), logits),
                                 check_trace=False)  # its check reruns the function untraced: direct
    assert counted == [1]
    torch.testing.assert_close(traced(x.detach(), logits), moe.fused_moe(x.detach(), logits, w13, w2, K), rtol=0,
                               atol=0)
