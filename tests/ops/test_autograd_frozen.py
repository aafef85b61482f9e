"""Frozen quantized experts: gradients for the input, the router weights and the biases, computed against the
dequantized weights, with the straight-through estimator for fp8 activation quantization; asking for the
gradient of a quantized weight (or of its scales) is a clear error at the op boundary.

The oracle is the dense fp64 model on the dequantized weights whose GEMM inputs go through the package's
fake quantization with an STE (``a + (q(a) - a).detach()``): the same quantized values the op's GEMMs saw.
Tolerance 1e-4 (``assert_grad_close``): fp32 math as in test_autograd.py, plus the rare fp8 rounding flip of an
intermediate the oracle computes in fp64 (c1, f(c1)) instead of fp32."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops.reference.quant import fake_quantize_activation

from tests.grad_cases import expert_case, requires_grad
from tests.grad_oracle import assert_grad_close, dense_experts, grads_of

NAMES = ("hidden_states", "topk_weights", "w13_bias", "w2_bias")
_DENSE = dict(hidden_states="x", topk_weights="tw", w13_bias="b13", w2_bias="b2")


def _ste(scheme, block):
    aq, group = scheme.act, scheme.act_group(block)
    if aq is None:
        return None

    def fq(a):
        q = fake_quantize_activation(a.detach().reshape(-1, a.shape[-1]).float(), aq, group).double()
        return a + (q.view(a.shape) - a).detach()

    return fq


CASES = {
    "fp8_tensor-silu": dict(scheme="fp8_tensor"),
    "fp8_tensor-swigluoai-on_input": dict(scheme="fp8_tensor", activation="swigluoai", on_input=True),
    "fp8_channel-gelu-expert_map": dict(scheme="fp8_channel", activation="gelu", expert_map=True),
    "fp8_block-32": dict(scheme="fp8_block", H=64, I=32, block_shape=[32, 32]),
    "int8-silu_no_mul-k1": dict(scheme="int8_w8a16", activation="silu_no_mul", k=1),
    "int4-G32-T33": dict(scheme="int4_w4a16", H=64, I=32, T=33, block_shape=[1, 32]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_input_gradients_through_dequantized_weights(name):
    case = requires_grad(expert_case(**CASES[name]), NAMES)
    op = case["op"]
    out = torch_moe_ops.fused_experts(**op)
    got = dict(zip(NAMES, torch.autograd.grad(out, [op[n] for n in NAMES], case["grad"])))
    block = tuple(op["block_shape"]) if op.get("block_shape") else None
    dense = dict(case["dense"], fq=_ste(case["scheme"], block))
    want = grads_of(dense_experts, dense, case["grad"].double())
    for n in NAMES:
        assert_grad_close(want[_DENSE[n]], got[n], 1e-4, n)


def _fp8_case():
    case = expert_case(scheme="fp8_tensor")
    op = case["op"]
    op["hidden_states"].requires_grad_()
    return op


@pytest.mark.parametrize("tensor", ["w13", "w2", "w13_scale", "w2_scale"])
def test_grad_of_quantized_weight_is_an_error(tensor):
    op = _fp8_case()
    op[tensor] = op[tensor].clone().requires_grad_()  # fp8 tensors may require grad; int8/uint8 cannot
    what = "is quantized" if tensor in ("w13", "w2") else "is a scale of quantized weights"
    with pytest.raises(ValueError, match=rf"{tensor} {what} \(fp8_tensor\); quantized weights and their scales "
                                         "are frozen"):
        torch_moe_ops.fused_experts(**op)


def test_fused_moe_refuses_too():
    op = _fp8_case()
    op["w2"] = op["w2"].clone().requires_grad_()
    logits = torch.randn(op["hidden_states"].shape[0], op["w13"].shape[0], requires_grad=True)
    with pytest.raises(ValueError, match=r"w2 is quantized \(fp8_tensor\); quantized weights and their scales"):
        torch_moe_ops.fused_moe(op["hidden_states"], logits, op["w13"], op["w2"], 2, quant_scheme="fp8_tensor",
                                w13_scale=op["w13_scale"], w2_scale=op["w2_scale"])


def test_backward_op_refuses_quantized_weight_gradients():
    op = _fp8_case()
    x = op["hidden_states"].detach()
    with pytest.raises(ValueError, match=r"w13 is quantized \(fp8_tensor\); quantized weights and their scales"):
        torch.ops.moe._fused_experts_backward(
            torch.randn_like(x), x, op["w13"], op["w2"], op["topk_weights"], op["topk_ids"], None, "silu",
            "fp8_tensor", op["w13_scale"], op["w2_scale"], None, None, None, None, False, None, None, False,
            [True, True, False, False, False, False])


def test_without_grad_a_quantized_weight_may_still_require_grad():
    """Under no_grad nothing is recorded: the forward runs (inference with a requires_grad fp8 tensor)."""
    op = _fp8_case()
    op["w13"] = op["w13"].clone().requires_grad_()
    with torch.no_grad():
        assert torch_moe_ops.fused_experts(**op).shape == op["hidden_states"].shape
