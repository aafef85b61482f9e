"""``torch.library.opcheck`` with requires-grad samples: the autograd registrations are found
(``test_autograd_registration``) and fwd+bwd traced by AOTAutograd with dynamic shapes gives eager's outputs
and gradients (``test_aot_dispatch_dynamic``); the private backward op passes every check."""
import pytest
import torch
from torch.library import opcheck

from tests.grad_cases import DIFF, expert_case, requires_grad

try:
    from expecttest import TestCase
except ImportError:  # pragma: no cover
    TestCase = None

pytestmark = pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # from opcheck internals
GRAD_UTILS = ("test_autograd_registration", "test_aot_dispatch_dynamic")
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic",
             "test_aot_dispatch_static")
_ORDER = ("hidden_states", "w13", "w2", "topk_weights", "topk_ids", "activation", "quant_scheme", "w13_scale",
          "w2_scale", "w13_bias", "w2_bias", "block_shape", "expert_map")
_KW = ("apply_router_weight_on_input", "activation_alpha", "activation_limit")


@pytest.mark.skipif(TestCase is None, reason="expecttest is not installed")
class TestPrivateSchemas(TestCase if TestCase is not None else object):
    """The private ops appear in traced graphs: change their schemas on purpose (EXPECTTEST_ACCEPT=1)."""

    def test_backward(self):
        self.assertExpectedInline(str(torch.ops.moe._fused_experts_backward.default._schema), """moe::_fused_experts_backward(Tensor grad_out, Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor? c1, str activation, str quant_scheme, Tensor? w13_scale, Tensor? w2_scale, Tensor? w13_bias, Tensor? w2_bias, int[]? block_shape, Tensor? expert_map, bool apply_router_weight_on_input, float? activation_alpha, float? activation_limit, bool batch_invariant, bool[] needs) -> (Tensor grad_hidden_states, Tensor grad_w13, Tensor grad_w2, Tensor grad_w13_bias, Tensor grad_w2_bias, Tensor grad_topk_weights)""")  # noqa: E501

    def test_train(self):
        self.assertExpectedInline(str(torch.ops.moe._fused_experts_train.default._schema), """moe::_fused_experts_train(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, str activation="silu", str quant_scheme="none", Tensor? w13_scale=None, Tensor? w2_scale=None, Tensor? w13_bias=None, Tensor? w2_bias=None, int[]? block_shape=None, Tensor? expert_map=None, *, bool apply_router_weight_on_input=False, float? activation_alpha=None, float? activation_limit=None, bool batch_invariant=False) -> (Tensor out, Tensor c1)""")  # noqa: E501


def _experts_sample(names=DIFF, **kw):
    op = requires_grad(expert_case(**kw), names)["op"]
    op.setdefault("quant_scheme", "none")
    args = tuple(op.get(n) for n in _ORDER)
    return args, {n: op[n] for n in _KW if n in op}


EXPERTS = {
    "fp32-all-grads-bias": dict(),
    "bf16-swigluoai-on_input-expert_map": dict(dtype=torch.bfloat16, activation="swigluoai", on_input=True,
                                               expert_map=True),
    "fp32-relu2_no_mul-k1-x-only": dict(activation="relu2_no_mul", k=1, names=("hidden_states",)),
    "fp8_channel-frozen": dict(scheme="fp8_channel", names=("hidden_states", "topk_weights", "w13_bias")),
}


@pytest.mark.parametrize("name", list(EXPERTS))
def test_fused_experts_opcheck_with_grad(name):
    args, kw = _experts_sample(**EXPERTS[name])
    opcheck(torch.ops.moe.fused_experts.default, args, kw, test_utils=GRAD_UTILS)


@pytest.mark.parametrize("name", ["fp32-all-grads-bias", "fp8_channel-frozen"])
def test_saving_forward_opcheck(name):
    """``moe::_fused_experts_train`` (out, c1): every check, with requires-grad samples."""
    args, kw = _experts_sample(**EXPERTS[name])
    utils = ALL_UTILS[1:] if "fp8" in name else ALL_UTILS  # test_schema's allclose has no CPU fp8 kernel
    opcheck(torch.ops.moe._fused_experts_train.default, args, kw, test_utils=utils)


@pytest.mark.parametrize("grouped", [False, True], ids=["softmax", "grouped-sigmoid-bias"])
def test_fused_moe_opcheck_with_grad(grouped):
    op = requires_grad(expert_case(T=5, E=8, activation="gelu"), ("hidden_states", "w13", "w2", "w2_bias"))["op"]
    logits = torch.randn(5, 8, requires_grad=True)
    if grouped:  # the correction bias (selection only) gets no gradient
        routing = (2, True, "sigmoid", 4, 2, (torch.randn(8) * 0.1).requires_grad_(), 2.5)
    else:
        routing = (2, True, "softmax", 0, 0, None, 1.0)
    args = (op["hidden_states"], logits, op["w13"], op["w2"], *routing, "gelu", "none", None, None, op["w13_bias"],
            op["w2_bias"])
    opcheck(torch.ops.moe.fused_moe.default, args, {}, test_utils=GRAD_UTILS)


def test_topk_route_opcheck_with_grad():
    logits = torch.randn(7, 16, requires_grad=True)
    opcheck(torch.ops.moe.topk_route.default, (logits, 3, True, "sigmoid", 4, 2, torch.randn(16)),
            dict(routed_scaling_factor=2.0), test_utils=GRAD_UTILS)
    opcheck(torch.ops.moe.topk_route.default, (torch.randn(1, 6).bfloat16().requires_grad_(), 2), {},
            test_utils=GRAD_UTILS)


BACKWARD = {
    "all": ([True] * 6, dict()),
    "x-and-weights-on_input": ([True, False, False, False, False, True], dict(on_input=True, expert_map=True)),
    "w13-only-bf16": ([False, True, False, True, False, False], dict(dtype=torch.bfloat16)),
    "saved-c1": ([True, True, True, True, True, True], dict(activation="swigluoai")),
}


@pytest.mark.parametrize("name", list(BACKWARD))
def test_backward_op_opcheck(name):
    needs, kw = BACKWARD[name]
    op = expert_case(**kw)["op"]
    x = op["hidden_states"]
    c1 = None
    if name == "saved-c1":
        from torch_moe_ops.reference import backward as RB
        from torch_moe_ops.schemes import get_activation, get_quant_scheme

        act = get_activation(op["activation"])
        c1 = RB.fused_experts_forward(x, op["w13"], op["w2"], op["topk_weights"], op["topk_ids"], act,
                                      get_quant_scheme("none"), None, None, op["w13_bias"], op["w2_bias"], None,
                                      None, False, act.alpha(None), act.limit(None))[1].to(x.dtype)
    args = (torch.randn_like(x), x, op["w13"], op["w2"], op["topk_weights"], op["topk_ids"], c1, op["activation"],
            "none", None, None, op["w13_bias"], op["w2_bias"], None, op["expert_map"],
            op["apply_router_weight_on_input"], None, op["activation_limit"], False, needs)
    opcheck(torch.ops.moe._fused_experts_backward.default, args, {}, test_utils=ALL_UTILS)
