"""FusedMoE construction and forward paths (docs/design.md §2, §3, §9): parameters, forward against the ops, routing
options, shared experts, unloaded layers, config validation (the weight_loader contract: loading/test_loader.py)."""
import pytest
import torch
from torch import nn

import torch_moe_ops
from torch_moe_ops import reference
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.quantization import Fp8Config, Int8WeightOnlyConfig, LoadError
from torch_moe_ops.testing import random_moe_weights, sqnr_db

from tests.moe_models import QUANT_SCHEMES, SCHEMES

E, K, H, I, T = 8, 2, 64, 48, 33


def _inputs(T=T, E=E, H=H):
    return torch.randn(T, H, dtype=torch.bfloat16) / 2, torch.randn(T, E)


def _loaded(qc=None, *, w=None, **kw):
    layer = FusedMoE(E, K, H, I, quant_config=qc, **kw)
    w13, w2, b13, b2 = w if w is not None else random_moe_weights(E, H, I, gated=layer.gated, bias=layer.has_bias)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)
    return layer


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_parameters(scheme):
    qc = SCHEMES[scheme]
    layer = FusedMoE(E, K, H, I, quant_config=qc, has_bias=True, use_correction_bias=True)
    params = dict(layer.named_parameters())
    assert params["w13_weight"].shape == (E, 2 * I, H) and params["w2_weight"].shape == (E, H, I)
    assert params["w13_bias"].shape == (E, 2 * I) and params["w2_bias"].shape == (E, H)
    assert params["e_score_correction_bias"].dtype == torch.float32
    assert not any(p.is_meta or p.requires_grad for p in params.values())
    if qc is None:
        assert params["w13_weight"].dtype == torch.bfloat16 and "w13_weight_scale" not in params
        return
    qdtype = torch.int8 if scheme.startswith("int8") else torch.float8_e4m3fn
    assert params["w13_weight"].dtype == params["w2_weight"].dtype == qdtype
    # quantized storage is real, on the target device, from construction; the full-precision weights are meta
    assert params["w13_weight"].device.type == "cpu"
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in layer.full_precision.values())
    expected = {
        "fp8_tensor": ((E, 2), (E,)),
        "fp8_channel": ((E, 2 * I), (E, H)),
        "fp8_block": ((E, 3, 2), (E, 2, 2)),  # ceil(96/32), ceil(64/32); ceil(64/32), ceil(48/32)
        "int8_w8a16": ((E, 2 * I), (E, H)),
    }[scheme]
    assert (params["w13_weight_scale"].shape, params["w2_weight_scale"].shape) == expected


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_non_gated_allocates_i_rows(scheme):
    layer = FusedMoE(E, K, H, I, quant_config=SCHEMES[scheme], activation="relu2_no_mul", has_bias=True)
    assert layer.w13_weight.shape == (E, I, H) and layer.w13_bias.shape == (E, I)  # not 2I (docs/design.md §12)
    if scheme == "fp8_tensor":
        assert layer.w13_weight_scale.shape == (E, 1)
    w13, w2, b13, b2 = random_moe_weights(E, H, I, gated=False, bias=True)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)
    x, logits = _inputs()
    assert layer(x, logits).shape == (T, H)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_forward_matches_ops(scheme):
    layer = _loaded(SCHEMES[scheme], has_bias=True)
    x, logits = _inputs()
    out = layer(x, logits)
    expected = torch_moe_ops.fused_moe(
        x, logits, layer.w13_weight, layer.w2_weight, K, quant_scheme=layer.quant_scheme,
        w13_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale, w13_bias=layer.w13_bias,
        w2_bias=layer.w2_bias, block_shape=layer.block_shape)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    weights, ids = layer.select_experts(logits)
    torch.testing.assert_close(layer.forward_experts(x, weights, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_quantized_close_to_full_precision(scheme):
    w = random_moe_weights(E, H, I)
    x, logits = _inputs()
    ref = _loaded(None, w=w)(x, logits).float()
    out = _loaded(QUANT_SCHEMES[scheme], w=w)(x, logits).float()
    assert sqnr_db(ref, out) > 20  # docs/design.md §13: quantized vs unquantized outputs > 20 dB


def test_quantized_slots_equal_quantize_weight():
    """Each expert's slot holds exactly what quantize_weight gives for that expert (gate/up scales apart)."""
    w13, w2, _, _ = random_moe_weights(E, H, I)
    for qc in QUANT_SCHEMES.values():
        layer = _loaded(qc, w=(w13, w2, None, None))
        shards = 2 if qc.quant_scheme.weight.sharded else 1  # fp8_tensor: gate and up scales
        q13, s13 = reference.quant.quantize_weight(w13, qc.weight_scheme, qc.kernel_block_shape, shards)
        q2, s2 = reference.quant.quantize_weight(w2, qc.weight_scheme, qc.kernel_block_shape)
        assert torch.equal(layer.w13_weight.view(torch.uint8), q13.view(torch.uint8))
        assert torch.equal(layer.w2_weight.view(torch.uint8), q2.view(torch.uint8))
        torch.testing.assert_close(layer.w13_weight_scale, s13.reshape(layer.w13_weight_scale.shape))
        torch.testing.assert_close(layer.w2_weight_scale, s2.reshape(layer.w2_weight_scale.shape))


def test_routing_options_reach_the_op():
    kw = dict(scoring_func="sigmoid", num_expert_group=4, topk_group=2, use_correction_bias=True,
              routed_scaling_factor=2.5, renormalize=True)
    w13, w2, _, _ = random_moe_weights(E, H, I)
    bias = torch.rand(E)
    layer = FusedMoE(E, K, H, I, **kw)
    layer.load_weights(w13, w2, e_score_correction_bias=bias)
    x, logits = _inputs()
    expected = torch_moe_ops.fused_moe(x, logits, w13, w2, K, renormalize=True, scoring_func="sigmoid",
                                       num_expert_group=4, topk_group=2, e_score_correction_bias=bias,
                                       routed_scaling_factor=2.5)
    torch.testing.assert_close(layer(x, logits), expected, atol=0, rtol=0)


def test_apply_router_weight_on_input():
    w = random_moe_weights(E, H, I)
    x, logits = _inputs()
    layer = _loaded(None, w=w, apply_router_weight_on_input=True)
    expected = torch_moe_ops.fused_moe(x, logits, w[0], w[1], K, apply_router_weight_on_input=True)
    torch.testing.assert_close(layer(x, logits), expected, atol=0, rtol=0)


def test_shared_experts_added_on_original_input():
    shared = nn.Linear(H, H, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    layer = _loaded(None, shared_experts=shared)
    x, logits = _inputs()
    x_orig = torch.randn_like(x)
    routed = torch_moe_ops.fused_moe(x, logits, layer.w13_weight, layer.w2_weight, K)
    torch.testing.assert_close(layer(x, logits), routed + shared(x), atol=0, rtol=0)
    torch.testing.assert_close(layer(x, logits, shared_experts_input=x_orig), routed + shared(x_orig), atol=0, rtol=0)
    assert "shared_experts.weight" in dict(layer.named_parameters())


@pytest.mark.parametrize("scheme", ["none", "fp8_tensor"])
def test_swigluoai_interleaves_gate_and_up(scheme):
    """w1/w3 shards land on even/odd rows; one fp8_tensor scale covers the interleaved w13."""
    w1 = torch.randn(E, I, H) / 10
    w3 = torch.randn(E, I, H) / 10
    w2 = torch.randn(E, H, I) / 10
    layer = FusedMoE(E, K, H, I, activation="swigluoai", quant_config=SCHEMES[scheme])
    assert layer.activation_limit == 7.0
    for e in range(E):
        layer.weight_loader(layer.w13_weight, w1[e], "w1", e)
        layer.weight_loader(layer.w13_weight, w3[e], "w3", e)
        layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
    layer.finalize_loading()
    interleaved = torch.stack([w1, w3], 2).reshape(E, 2 * I, H)
    fused = FusedMoE(E, K, H, I, activation="swigluoai", quant_config=SCHEMES[scheme])
    fused.load_weights(interleaved, w2)  # a fused gate_up checkpoint is already interleaved
    assert torch.equal(layer.w13_weight.view(torch.uint8), fused.w13_weight.view(torch.uint8))
    if scheme == "fp8_tensor":
        assert layer.w13_weight_scale.shape == (E, 1)
    x, logits = _inputs()
    torch.testing.assert_close(layer(x, logits), fused(x, logits), atol=0, rtol=0)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_forward_refuses_unloaded_quantized_layer(scheme):
    layer = FusedMoE(E, K, H, I, quant_config=QUANT_SCHEMES[scheme])
    x, logits = _inputs()
    with pytest.raises(RuntimeError, match="not loaded"):
        layer(x, logits)


def test_fresh_unquantized_layer_refuses_and_load_state_dict_counts_as_loaded():
    """Its storage is torch.empty (uninitialised memory) until loaded: forward refuses, also after writes
    behind the loader's back; a full load_state_dict counts as a load."""
    layer = FusedMoE(E, K, H, I, has_bias=True)
    x, logits = _inputs()
    with pytest.raises(LoadError, match=r"weights are not loaded \(fresh\)"):
        layer(x, logits)
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True)
    layer.w13_weight.copy_(w13)
    layer.w2_weight.copy_(w2)
    with pytest.raises(LoadError, match="not loaded"):
        layer.forward_experts(x, *layer.select_experts(logits))
    layer.load_state_dict({"w13_weight": w13, "w2_weight": w2, "w13_bias": b13, "w2_bias": b2})
    assert layer.is_loaded and layer.load_state == "loaded"
    expected = torch_moe_ops.fused_moe(x, logits, w13, w2, K, w13_bias=b13, w2_bias=b2)
    torch.testing.assert_close(layer(x, logits), expected, atol=0, rtol=0)
    partial = FusedMoE(E, K, H, I, has_bias=True)
    partial.load_state_dict({"w13_weight": w13, "w2_weight": w2}, strict=False)  # biases missing: not loaded
    with pytest.raises(LoadError, match="not loaded"):
        partial(x, logits)


def test_config_validation():
    with pytest.raises(ValueError, match="scheme must be one of"):
        Fp8Config("tensorwise")
    with pytest.raises(ValueError, match="block_shape"):
        Fp8Config("block", block_shape=(128,))
    with pytest.raises(ValueError, match="quant_config='fp8' is not a scheme name.*granularity"):
        FusedMoE(E, K, H, I, quant_config="fp8")
    with pytest.raises(TypeError, match="quant_config must be None, a scheme name"):
        FusedMoE(E, K, H, I, quant_config=8)
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(E, E + 1, H, I)
    with pytest.raises(ValueError, match="grouped top-k"):
        FusedMoE(E, K, H, I, num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="relu2_no_mul"):
        FusedMoE(E, K, H, I, activation="relu2")
    assert Fp8Config("block").kernel_block_shape == [128, 128] and Fp8Config().kernel_block_shape is None
    assert Int8WeightOnlyConfig().expert_scheme == "int8_w8a16"
    assert "quant_scheme='fp8_block'" in repr(FusedMoE(E, K, H, I, quant_config=Fp8Config("block")))
