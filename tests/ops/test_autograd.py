"""Gradients of ``fused_experts`` / ``fused_moe`` / ``topk_route`` (CPU reference backend) against autograd of
the fp64 dense oracle (``tests/grad_oracle.py``) on the same inputs.

Tolerances (``assert_grad_close``: norm-relative error per gradient, with a small absolute floor): fp32
1e-5: the op computes in fp32 with reductions over at most ~70 terms, i.e. ~1e-7 relative, and 100x leaves
room for the order of the sums. bf16 / fp16 2e-2: the inputs are the same rounded values, the op rounds its
outputs to 8 or 11 mantissa bits, so each gradient carries ~2^-8 relative error per rounding (the forward's
table, docs/design.md §13, allows 1e-2 for one rounding stage)."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops.schemes import ACTIVATIONS

from tests.grad_cases import DIFF, expert_case, requires_grad
from tests.grad_oracle import assert_grad_close, dense_experts, dense_route_weights, grads_of

_DENSE = dict(hidden_states="x", w13="w13", w2="w2", topk_weights="tw", w13_bias="b13", w2_bias="b2")


def op_grads(case, names=DIFF):
    op = case["op"]
    names = [n for n in names if op.get(n) is not None]
    out = torch_moe_ops.fused_experts(**op)
    got = torch.autograd.grad(out, [op[n] for n in names], case["grad"])
    return dict(zip(names, got))


def check_against_dense(case, tol, names=DIFF):
    got = op_grads(case, names)
    want = grads_of(dense_experts, case["dense"], case["grad"].double())
    for n, g in got.items():
        w = want[_DENSE[n]]
        assert g.dtype == case["op"][n].dtype and g.shape == case["op"][n].shape, n
        assert_grad_close(w, g, tol, n)
    return got


VARIANTS = {
    "plain": dict(),
    "on_input-expert_map-empty": dict(on_input=True, expert_map=True, empty_expert=True),
    "clamp-k1-T1": dict(limit=0.4, k=1, T=1),
    "T33-E5-k3-strided": dict(T=33, E=5, k=3, bias=False, strided=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_fused_experts_fp32(activation, variant):
    case = requires_grad(expert_case(activation=activation, **VARIANTS[variant]))
    check_against_dense(case, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation,kw", [("silu", {}), ("swigluoai", dict(on_input=True, expert_map=True)),
                                           ("gelu_tanh_no_mul", dict(k=1))])
def test_fused_experts_half(dtype, activation, kw):
    case = requires_grad(expert_case(activation=activation, dtype=dtype, **kw))
    check_against_dense(case, 2e-2)


def test_non_local_pairs_get_no_gradient():
    """Pairs routed to another rank's expert contribute exactly 0 to every gradient here."""
    case = requires_grad(expert_case(T=9, expert_map=True))
    got = op_grads(case)
    local = case["op"]["expert_map"].long()[case["op"]["topk_ids"].long()]
    assert (local < 0).any() and (local >= 0).any()
    assert (got["topk_weights"][local < 0] == 0).all()
    tokens_all_remote = (local < 0).all(1)
    assert (got["hidden_states"][tokens_all_remote] == 0).all()


def test_empty_batch():
    case = requires_grad(expert_case(T=0))
    got = op_grads(case)
    assert got["hidden_states"].shape == (0, 23) and all((g == 0).all() for g in got.values())


def test_frozen_weights_only_input_grads():
    """Only hidden_states requires grad: the weights' gradients are not computed (None), the input one is."""
    case = requires_grad(expert_case(), names=("hidden_states",))
    check_against_dense(case, 1e-5, names=("hidden_states",))


# ------------------------------------------------------------------------------------------ routing
MOE_VARIANTS = {
    "softmax-renorm": dict(),
    "sigmoid-rsf": dict(renormalize=False, scoring_func="sigmoid", routed_scaling_factor=2.5),
    "grouped-bias": dict(scoring_func="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=1.5),
}


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-logits"])
@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_fused_moe(variant, logits_dtype):
    kw = dict(MOE_VARIANTS[variant])
    E, k, T = 8, 2, 7
    case = expert_case(T=T, E=E, k=k, activation="gelu")
    op = case["op"]
    logits = (torch.randn(T, E) * 2).to(logits_dtype).requires_grad_()
    bias = None
    if variant == "grouped-bias":  # selection only: its gradient is None (zero)
        bias = (torch.randn(E) * 0.1).requires_grad_()
        kw["e_score_correction_bias"] = bias
    leaves = [op["hidden_states"].requires_grad_(), op["w13"].requires_grad_(), op["w2"].requires_grad_(),
              op["w13_bias"].requires_grad_(), logits]
    out = torch_moe_ops.fused_moe(op["hidden_states"], logits, op["w13"], op["w2"], k, activation="gelu",
                                  w13_bias=op["w13_bias"], w2_bias=op["w2_bias"], **kw)
    got = torch.autograd.grad(out, leaves + ([bias] if bias is not None else []), case["grad"], allow_unused=True)
    ids = torch_moe_ops.topk_route(logits.detach(), k, **{n: v for n, v in kw.items()})[1]
    d = case["dense"]
    dlog = logits.detach().double().requires_grad_()
    dense_in = [d["x"].requires_grad_(), d["w13"].requires_grad_(), d["w2"].requires_grad_(),
                d["b13"].requires_grad_(), dlog]
    tw = dense_route_weights(dlog, ids, kw.get("renormalize", True), kw.get("scoring_func", "softmax"),
                             kw.get("routed_scaling_factor", 1.0))
    want = torch.autograd.grad(dense_experts(**{**d, "tw": tw, "ids": ids}), dense_in, case["grad"].double())
    tol = 1e-5 if logits_dtype == torch.float32 else 2e-2
    for name, g, w in zip(("x", "w13", "w2", "b13", "logits"), got, want):
        assert_grad_close(w, g, tol, name)
    assert got[4].dtype == logits_dtype
    if bias is not None:
        assert got[5] is None


def test_modular_route_then_experts_equals_fused_moe():
    E, k, T = 6, 2, 9
    case = expert_case(T=T, E=E, k=k)
    op = case["op"]
    logits = torch.randn(T, E, requires_grad=True)
    x = op["hidden_states"].requires_grad_()
    fused = torch_moe_ops.fused_moe(x, logits, op["w13"], op["w2"], k, w13_bias=op["w13_bias"], w2_bias=op["w2_bias"])
    g_fused = torch.autograd.grad(fused, (x, logits), case["grad"])
    w, ids = torch_moe_ops.topk_route(logits, k)
    modular = torch_moe_ops.fused_experts(x, op["w13"], op["w2"], w, ids, w13_bias=op["w13_bias"],
                                          w2_bias=op["w2_bias"])
    g_mod = torch.autograd.grad(modular, (x, logits), case["grad"])
    for a, b in zip(g_fused, g_mod):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_topk_route_non_finite_logits():
    """NaN / ±Inf logits are sanitized (docs/design.md §4): their gradient is 0, the others' stay finite."""
    logits = torch.randn(4, 6)
    logits[0, 1], logits[1, 2], logits[2] = float("nan"), float("inf"), float("nan")
    logits.requires_grad_()
    w, ids = torch_moe_ops.topk_route(logits, 2)
    (g,) = torch.autograd.grad((w * torch.randn_like(w)).sum(), logits)
    assert torch.isfinite(g).all()
    assert g[0, 1] == 0 and g[1, 2] == 0 and (g[2] == 0).all()
    assert g[3].abs().sum() > 0


def test_topk_route_alone_vs_dense():
    logits = torch.randn(11, 16, requires_grad=True)
    w, ids = torch_moe_ops.topk_route(logits, 4, scoring_func="sigmoid", routed_scaling_factor=2.0)
    c = torch.randn_like(w)
    (got,) = torch.autograd.grad((w * c).sum(), logits)
    dl = logits.detach().double().requires_grad_()
    (want,) = torch.autograd.grad((dense_route_weights(dl, ids, True, "sigmoid", 2.0) * c.double()).sum(), dl)
    assert_grad_close(want, got, 1e-5)
