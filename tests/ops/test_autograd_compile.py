"""fwd + bwd under ``torch.compile(fullgraph=True, dynamic=True)``: one forward and one backward graph for
every token count (T unbacked, recompiles are errors), gradients equal to eager's."""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import torch_moe_ops
from torch_moe_ops.testing import quantize_experts

pytestmark = pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # torch.compile internals
E, H, I, K = 6, 24, 16, 2
TOKENS = (1, 2, 17, 33)


class _Counting:
    """An aot_eager backend that counts the forward and backward graphs it is given."""

    def __init__(self):
        self.fw = self.bw = 0

        def fw(gm, _):
            self.fw += 1
            return make_boxed_func(gm.forward)

        def bw(gm, _):
            self.bw += 1
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=fw, bw_compiler=bw)


def _run(fn, make_inputs, leaves_of, tokens=TOKENS, atol=0.0, token_args=1):
    """``make_inputs(T)``: the arguments, the first ``token_args`` of them [T, ...] (their T is marked unbacked)."""
    torch._dynamo.reset()
    counting = _Counting()
    compiled = torch.compile(fn, backend=counting.backend, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in tokens:
            inputs = make_inputs(T)
            for t in inputs[:token_args]:
                torch._dynamo.decorators.mark_unbacked(t, 0)
            grads = []
            for f in (compiled, fn):
                out = f(*inputs)
                grads.append((out, *torch.autograd.grad(out, leaves_of(inputs), torch.ones_like(out))))
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (counting.fw, counting.bw) == (1, 1), f"{counting.fw} forward / {counting.bw} backward graphs"
    torch._dynamo.reset()


def test_fused_moe_trainable_weights():
    w13 = (torch.randn(E, 2 * I, H) / 5).requires_grad_()
    w2 = (torch.randn(E, H, I) / 5).requires_grad_()
    b2 = (torch.randn(E, H) / 5).requires_grad_()
    gate = (torch.randn(E, H) / 5).requires_grad_()

    def fn(x, gate, w13, w2, b2):
        return torch_moe_ops.fused_moe(x, x @ gate.t(), w13, w2, K, scoring_func="sigmoid", num_expert_group=3,
                                       topk_group=2, routed_scaling_factor=2.5, w2_bias=b2)

    _run(fn, lambda t: ((torch.randn(t, H) / 2).requires_grad_(), gate, w13, w2, b2), lambda inp: inp)


def test_modular_chain_on_input_expert_map():
    w13 = (torch.randn(E, 2 * I, H) / 5).requires_grad_()
    w2 = (torch.randn(E, H, I) / 5).requires_grad_()
    emap = torch.tensor([0, -1, 1, 2, -1, 3, 4, 5], dtype=torch.int32)
    router = torch.nn.Linear(H, 8)

    def fn(x, w13, w2):
        w, ids = torch_moe_ops.topk_route(router(x), K)
        return torch_moe_ops.fused_experts(x, w13, w2, w, ids, activation="swigluoai", expert_map=emap,
                                           apply_router_weight_on_input=True) * 2

    _run(fn, lambda t: ((torch.randn(t, H) / 2).requires_grad_(), w13, w2),
         lambda inp: (inp[0], inp[1], inp[2], router.weight))


@pytest.mark.parametrize("scheme", ["fp8_block", "int4_w4a16"])
def test_frozen_quantized(scheme):
    q13, q2, s13, s2, block = quantize_experts(torch.randn(E, 64, 64) / 5, torch.randn(E, 64, 32) / 5, scheme,
                                               block_shape=[32, 32] if scheme == "fp8_block" else [1, 32])
    b13 = (torch.randn(E, 64) / 5).requires_grad_()  # H = 64, I = 32: int4 groups of 32 divide both

    def fn(x, logits):
        return torch_moe_ops.fused_moe(x, logits, q13, q2, K, quant_scheme=scheme, w13_scale=s13, w2_scale=s2,
                                       block_shape=list(block), w13_bias=b13)

    _run(fn, lambda t: ((torch.randn(t, 64) / 2).requires_grad_(), torch.randn(t, E, requires_grad=True)),
         lambda inp: (*inp, b13), token_args=2)


def test_inductor():
    """The same fwd + bwd through Inductor (CPU codegen; routing backward fused by it), T in {1, 17}."""
    w13 = (torch.randn(E, 2 * I, H) / 5).requires_grad_()
    w2 = (torch.randn(E, H, I) / 5).requires_grad_()

    def fn(x, logits, w13, w2):
        return torch_moe_ops.fused_moe(x, logits, w13, w2, K) * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (1, 17):
            x, logits = torch.randn(T, H, requires_grad=True), torch.randn(T, E, requires_grad=True)
            torch._dynamo.decorators.mark_unbacked(x, 0)
            torch._dynamo.decorators.mark_unbacked(logits, 0)
            got = torch.autograd.grad(compiled(x, logits, w13, w2).sum(), (x, logits, w13, w2))
            want = torch.autograd.grad(fn(x, logits, w13, w2).sum(), (x, logits, w13, w2))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_saving_forward():
    """The saving forward (``moe::_fused_experts_train``): c1 crosses from the forward to the backward graph."""
    w13 = (torch.randn(E, I, H) / 5).requires_grad_()
    w2 = (torch.randn(E, H, I) / 5).requires_grad_()
    gate = (torch.randn(E, H) / 5).requires_grad_()

    def fn(x, gate, w13, w2):
        w, ids = torch_moe_ops.topk_route(x @ gate.t(), K)
        out, _ = torch.ops.moe._fused_experts_train(x, w13, w2, w, ids, "gelu_tanh_no_mul")
        return out

    _run(fn, lambda t: ((torch.randn(t, H) / 2).requires_grad_(), gate, w13, w2), lambda inp: inp)
