"""``moe::act_and_mul`` against the float64 formulas of docs/design.md §6. fp32 outputs to 1e-5 relative; bf16/fp16
outputs to one rounding step of the output dtype (the op computes in fp32 and casts once)."""
import pytest
import torch

from . import oracle
import torch_moe_ops

from ._data import padded

GATED = ["silu", "gelu", "gelu_tanh", "gelu_pytorch_tanh", "swigluoai"]
NO_MUL = ["silu_no_mul", "gelu_no_mul", "gelu_tanh_no_mul", "relu2_no_mul"]
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -7, 1e-5), torch.float16: (2 ** -10, 1e-5)}  # one output ulp


def _check(x, activation, **kw):
    with torch.inference_mode():
        y = torch_moe_ops.act_and_mul(x, activation, **kw)
    ref = oracle.activation(x, activation, kw.get("alpha", 1.702), kw.get("limit"))
    assert y.dtype == x.dtype and y.shape == ref.shape
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), ref.to(x.dtype).double() if x.dtype != torch.float32 else ref,
                               rtol=rtol, atol=atol)
    return y


@pytest.mark.parametrize("activation", GATED + NO_MUL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 80), (7, 176), (333, 2, 80)], ids=["T1-N80", "T7-N176", "T333-k2-N80"])
def test_activation(activation, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    _check(x, activation)


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("limit", [7.0, 0.5])
def test_clamp_limit(activation, limit):
    """§6: gate clamped from above only, up on both sides; silu + limit is the clamped swiglu."""
    x = torch.randn(64, 88) * 10
    y = _check(x, activation, limit=limit)
    unclamped = torch_moe_ops.act_and_mul(x, activation, limit=0.0)
    assert not torch.allclose(y, unclamped), "inputs of scale 10 must hit the clamp"


def test_swigluoai_alpha_and_layout():
    x = torch.randn(33, 40) * 3
    _check(x, "swigluoai", alpha=1.0, limit=7.0)
    # interleaved: a gate of -inf-like values in even columns kills every output
    x[:, 0::2] = -30.0
    assert torch_moe_ops.act_and_mul(x, "swigluoai", limit=7.0).abs().max() < 1e-9


@pytest.mark.parametrize("activation", ["silu", "relu2_no_mul"])
def test_strided_rows(activation):
    x = padded(torch.randn(7, 88))
    _check(x, activation)


def test_odd_width_no_mul():
    _check(torch.randn(5, 41), "gelu_no_mul")
