"""``FusedMoE(quant_config=Mxfp4Config())``: E8M0 scale storage, streaming online quantization, reload in place,
meta construction, and gradients to the input through the frozen packed weights, each against the same layer
built unquantized on the dequantized weights (exact in bf16: E2M1 values times powers of two)."""
import pytest
import torch

import torch_moe_ops as moe

E, K, H, I = 6, 2, 64, 96


def _pair(activation="swigluoai", bias=True):
    torch.manual_seed(0)
    kw = dict(params_dtype=torch.bfloat16, activation=activation, has_bias=bias)
    mx, ref = moe.FusedMoE(E, K, H, I, quant_config=moe.Mxfp4Config(), **kw), moe.FusedMoE(E, K, H, I, **kw)
    w13, w2 = torch.randn(E, 2 * I, H).bfloat16() * 0.1, torch.randn(E, H, I).bfloat16() * 0.1
    biases = dict(w13_bias=torch.randn(E, 2 * I).bfloat16() * 0.1, w2_bias=torch.randn(E, H).bfloat16() * 0.1) \
        if bias else {}
    mx.load_weights(w13, w2, **biases)
    deq = [moe.reference.dequantize_weight(q, s, "mxfp4").bfloat16()
           for q, s in ((mx.w13_weight, mx.w13_weight_scale), (mx.w2_weight, mx.w2_weight_scale))]
    ref.load_weights(*deq, **biases)
    return mx, ref, (w13, w2, biases)


def test_storage_is_packed_with_e8m0_scales():
    mx, _, _ = _pair()
    assert mx.w13_weight.dtype == torch.uint8 and mx.w13_weight.shape == (E, 2 * I, H // 2)
    assert mx.w13_weight_scale.dtype == torch.uint8 and mx.w13_weight_scale.shape == (E, 2 * I, H // 32)
    assert mx.w2_weight_scale.shape == (E, H, I // 32) and mx.quant_scheme == "mxfp4"
    assert moe.FusedMoE(E, K, H, I, quant_config="mxfp4").quant_config == moe.Mxfp4Config()


@pytest.mark.parametrize("activation,bias", [("swigluoai", True), ("silu", False)])
def test_forward_equals_the_dequantized_layer(activation, bias):
    mx, ref, _ = _pair(activation, bias)
    x, logits = torch.randn(2, 5, H).bfloat16(), torch.randn(2, 5, E)
    torch.testing.assert_close(mx(x, logits), ref(x, logits), atol=0, rtol=0)


def test_reload_in_place_and_meta_construction():
    mx, _, (w13, w2, biases) = _pair()
    ptrs = [t.data_ptr() for t in (mx.w13_weight, mx.w13_weight_scale, mx.w2_weight, mx.w2_weight_scale)]
    before = mx.w13_weight.clone()
    mx.load_weights(w13 * 2, w2, **biases)
    assert [t.data_ptr() for t in (mx.w13_weight, mx.w13_weight_scale, mx.w2_weight, mx.w2_weight_scale)] == ptrs
    assert torch.equal(mx.w13_weight, before)  # x2 moves every scale up by one: the codes stay
    assert mx.load_state == "loaded"
    meta = moe.FusedMoE(E, K, H, I, quant_config=moe.Mxfp4Config(), device="meta")
    meta.to_empty(device="cpu")
    assert meta.w13_weight_scale.dtype == torch.uint8 and meta.w13_weight_scale.eq(127).all()  # "one" = 2^0


def test_dims_must_be_multiples_of_32():
    with pytest.raises(ValueError, match=r"not divisible by the group size 32"):
        moe.FusedMoE(E, K, 48, I, quant_config=moe.Mxfp4Config())


def test_input_gradient_through_frozen_weights():
    mx, ref, _ = _pair("silu", False)
    x = torch.randn(7, H).bfloat16()
    logits = torch.randn(7, E)
    grads = []
    for layer in (mx, ref):
        xi = x.clone().requires_grad_()
        layer(xi, logits).float().square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0].float(), grads[1].float(), atol=2e-2, rtol=2e-2)
