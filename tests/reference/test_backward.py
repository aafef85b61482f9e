"""``torch.autograd.gradcheck`` (fp64, finite differences) of the reference backward functions: the ops accept
bf16/fp16/fp32 only, so the fp64 check runs on ``reference.backward`` directly, wrapped in an
``autograd.Function`` whose backward is the function under test."""
import pytest
import torch

from torch_moe_ops.reference import backward as RB
from torch_moe_ops.schemes import ACTIVATIONS, get_activation, get_quant_scheme

from tests.grad_cases import random_ids

NONE = get_quant_scheme("none")
F64 = torch.float64


def _experts_fn(ids, act, emap, on_input, alpha, limit):
    class _Experts(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w13, w2, b13, b2, tw):
            ctx.save_for_backward(x, w13, w2, b13, b2, tw)
            return RB.fused_experts_forward(x, w13, w2, tw, ids, act, NONE, None, None, b13, b2, None, emap, on_input,
                                            alpha, limit)[0]

        @staticmethod
        def backward(ctx, grad):
            x, w13, w2, b13, b2, tw = ctx.saved_tensors
            dx, d13, d2, db13, db2, dtw = RB.fused_experts_backward(
                grad, x, w13, w2, tw, ids, act, NONE, None, None, b13, b2, None, emap, on_input, alpha, limit,
                list(ctx.needs_input_grad))  # the same order: x, w13, w2, b13, b2, tw
            return dx, d13, d2, db13, db2, dtw

    return _Experts.apply


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=F64) * scale).requires_grad_()


@pytest.mark.parametrize("variant", ["plain", "on_input-expert_map", "clamp-k1"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_fused_experts_backward_gradcheck(name, variant):
    act = get_activation(name)
    T, H, I, E = 3, 5, 3, 3
    k = 1 if variant == "clamp-k1" else 2
    emap = None
    E_glob = E
    if variant == "on_input-expert_map":  # global experts 1 and 3 live on another rank
        E_glob, emap = 5, torch.tensor([0, -1, 1, -1, 2], dtype=torch.int32)
    ids = random_ids(T, k, range(E_glob))
    # clamp-k1: a small limit so that some gate/up values fall beyond it (its gradient is then 0)
    limit = 0.3 if variant == "clamp-k1" else act.limit(None)
    x, w13, w2 = _leaf(T, H), _leaf(E, act.n1(I), H), _leaf(E, H, I, scale=0.5)
    b13, b2, tw = _leaf(E, act.n1(I)), _leaf(E, H), (torch.rand(T, k, dtype=F64) + 0.1).requires_grad_()
    fn = _experts_fn(ids, act, emap, variant == "on_input-expert_map", act.alpha(None), limit)
    assert torch.autograd.gradcheck(fn, (x, w13, w2, b13, b2, tw))


def test_backward_skips_what_is_not_needed():
    act = get_activation("silu")
    x, w13, w2 = torch.randn(4, 6, dtype=F64), torch.randn(2, 8, 6, dtype=F64), torch.randn(2, 6, 4, dtype=F64)
    ids, tw = random_ids(4, 2, range(2)), torch.rand(4, 2, dtype=F64)
    for needs in ([1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]):
        grads = RB.fused_experts_backward(torch.randn(4, 6, dtype=F64), x, w13, w2, tw, ids, act, NONE, None, None,
                                          None, None, None, None, False, 1.702, 0.0, needs)
        assert [g is not None for g in grads] == [bool(n) for n in needs]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward_matches_autograd(name):
    """The explicit derivatives (also the Triton kernel's formulas) against autograd of the forward, with values
    exactly on the clamp limits (torch.clamp passes the gradient there) and around 0."""
    act = get_activation(name)
    limit = 0.5 if act.gated else 0.0
    c1 = torch.randn(6, act.n1(8), dtype=F64) * 2
    c1[0, :4] = torch.tensor([limit, -limit, 0.0, 1e-3], dtype=F64)
    c1[1, -4:] = torch.tensor([limit, -limit, 0.0, -1e-3], dtype=F64)
    c1.requires_grad_()
    h = act.apply(c1, act.alpha(None), limit)
    dh = torch.randn_like(h)
    (want,) = torch.autograd.grad(h, c1, dh)
    got = act.backward(c1.detach(), dh, act.alpha(None), limit)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("renormalize,scoring,rsf", [(True, "softmax", 1.0), (False, "softmax", 2.5),
                                                     (True, "sigmoid", 2.5), (False, "sigmoid", 1.0)])
def test_topk_route_backward_gradcheck(renormalize, scoring, rsf):
    T, E, k = 5, 6, 3
    logits = torch.randn(T, E, dtype=F64)
    ids = torch.topk(logits, k, dim=1).indices.int()  # a fixed selection: the weights are smooth in the logits

    class _Route(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            ctx.save_for_backward(logits)
            s = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, -1)
            w = s.gather(1, ids.long())
            return (w / w.sum(-1, keepdim=True) if renormalize else w) * rsf

        @staticmethod
        def backward(ctx, grad):
            (logits,) = ctx.saved_tensors
            return RB.topk_route_backward(logits, ids, grad, renormalize, scoring, rsf)

    assert torch.autograd.gradcheck(_Route.apply, (logits.requires_grad_(),))
