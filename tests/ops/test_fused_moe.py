"""``moe::fused_moe`` (routing + fused experts in one op) against oracle.route + oracle.fused_experts.
Tolerances as in test_fused_experts (fp32: 1e-5; bf16: atol 2e-2 and 1e-2 relative; quantized fp32: 1e-3
relative on the same quantized weights, SQNR > 20 dB against the unquantized fp32 oracle)."""
import pytest
import torch

from . import oracle
import torch_moe_ops
from torch_moe_ops.testing import random_moe_weights, rel_error, sqnr_db

from ._data import random_expert_map

CASES = [  # T, E (logical), k, route kwargs, scheme, dtype, E_local (expert_map) or None, extra fused kwargs
    pytest.param(1, 8, 2, {}, "none", torch.float32, None, {}, id="E8-k2-T1-softmax"),
    pytest.param(64, 60, 6, {}, "none", torch.bfloat16, None, {}, id="E60-k6-T64-softmax-bf16"),
    pytest.param(33, 60, 6, dict(renormalize=False, routed_scaling_factor=2.5), "none", torch.float32, None, {},
                 id="E60-k6-T33-softmax-raw-rsf2.5"),
    pytest.param(33, 16, 2, dict(scoring_func="sigmoid", num_expert_group=8, topk_group=2, bias=True,
                                 routed_scaling_factor=2.5), "none", torch.float32, None, {},
                 id="E16-k2-G8-kG2-sigmoid-bias-rsf2.5"),
    pytest.param(33, 128, 2, dict(num_expert_group=8, topk_group=2), "none", torch.float32, None, {},
                 id="E128-k2-G8-kG2-softmax"),
    pytest.param(64, 256, 8, dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4, bias=True,
                                  routed_scaling_factor=2.5), "fp8_block", torch.float32, None,
                 dict(block_shape=[32, 32]), id="E256-k8-G8-kG4-sigmoid-bias-fp8_block32"),
    pytest.param(33, 384, 8, dict(num_expert_group=1, topk_group=1), "none", torch.bfloat16, None, {},
                 id="E384-k8-G1-kG1-bf16"),
    pytest.param(33, 60, 6, dict(routed_scaling_factor=2.5), "none", torch.float32, 30, {},
                 id="Eg60-El30-k6-T33-expert_map-rsf2.5"),
    pytest.param(33, 16, 2, {}, "fp8_channel", torch.float32, 8, {}, id="Eg16-El8-k2-T33-expert_map-fp8_channel"),
    pytest.param(33, 8, 2, {}, "fp8_tensor", torch.bfloat16, None, dict(apply_router_weight_on_input=True),
                 id="E8-k2-T33-fp8_tensor-on-input"),
    pytest.param(33, 8, 2, {}, "int8_w8a16", torch.bfloat16, None, dict(activation="gelu"),
                 id="E8-k2-T33-int8_w8a16-gelu"),
    pytest.param(33, 8, 2, {}, "none", torch.float32, None,
                 dict(activation="swigluoai", activation_limit=7.0, bias=True), id="E8-k2-T33-swigluoai-bias"),
]
WS = {"fp8_tensor": "fp8_tensor", "fp8_channel": "fp8_channel", "fp8_block": "fp8_block", "int8_w8a16": "int8_channel"}


@pytest.mark.parametrize("T,E,k,route,scheme,dtype,E_local,extra", CASES)
def test_fused_moe(T, E, k, route, scheme, dtype, E_local, extra):
    H, I = 72, 40
    route, extra = dict(route), dict(extra)
    bias = torch.randn(E) * 0.05 if route.pop("bias", False) else None
    with_bias = extra.pop("bias", False)
    activation = extra.get("activation", "silu")
    n_local = E_local or E
    w13, w2, b13, b2 = random_moe_weights(n_local, H, I, bias=with_bias, dtype=torch.float32,
                                          gated=not activation.endswith("_no_mul"))
    emap = random_expert_map(E, E_local) if E_local else None
    x = (torch.randn(T, H) / 10).to(dtype)
    logits = torch.randn(T, E).to(dtype)
    if scheme == "none":
        qw13, qw2, s13, s2 = w13.to(dtype), w2.to(dtype), None, None
    else:
        bs = extra.get("block_shape")
        shards = 2 if scheme == "fp8_tensor" else 1  # [E, 2]: gate and up scales
        qw13, s13 = torch_moe_ops.quantize_weight(w13, WS[scheme], block_shape=bs, shards=shards)
        qw2, s2 = torch_moe_ops.quantize_weight(w2, WS[scheme], block_shape=bs)
    with torch.inference_mode():
        out = torch_moe_ops.fused_moe(x, logits, qw13, qw2, k, e_score_correction_bias=bias, quant_scheme=scheme,
                                      w13_scale=s13, w2_scale=s2, w13_bias=b13, w2_bias=b2, expert_map=emap,
                                      **route, **extra)
    assert out.shape == (T, H) and out.dtype == dtype
    weights, ids = oracle.route(logits, k, route.get("renormalize", True), route.get("scoring_func", "softmax"),
                                route.get("num_expert_group", 0), route.get("topk_group", 0), bias,
                                route.get("routed_scaling_factor", 1.0))

    def ref(quantized):
        args = (qw13, qw2, scheme, s13, s2) if quantized else (w13, w2, "none", None, None)
        return oracle.fused_experts(x if quantized else x.float(), args[0], args[1], weights, ids, activation,
                                    args[2], args[3], args[4], b13, b2, extra.get("block_shape"), emap,
                                    extra.get("apply_router_weight_on_input", False), 1.702,
                                    extra.get("activation_limit"))

    expect = ref(True)
    if dtype == torch.float32:
        if scheme == "none":
            torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
        else:
            assert rel_error(expect, out) < 1e-3
    else:
        torch.testing.assert_close(out.float(), expect, rtol=0, atol=2e-2)
        assert rel_error(expect, out.float()) < 1e-2
    if scheme != "none":
        assert sqnr_db(ref(False), out.float()) > 20.0


def test_fused_moe_equals_modular_chain():
    """fused_moe == topk_route then fused_experts, bit for bit."""
    T, E, k = 33, 60, 6
    w13, w2, _, _ = random_moe_weights(E, 72, 40, dtype=torch.bfloat16)
    x, logits = torch.randn(T, 72).bfloat16() / 10, torch.randn(T, E)
    bias = torch.randn(E) * 0.05
    kw = dict(scoring_func="sigmoid", num_expert_group=4, topk_group=2, e_score_correction_bias=bias,
              routed_scaling_factor=2.5)
    w, ids = torch_moe_ops.topk_route(logits, k, **kw)
    chain = torch_moe_ops.fused_experts(x, w13, w2, w, ids)
    torch.testing.assert_close(torch_moe_ops.fused_moe(x, logits, w13, w2, k, **kw), chain, rtol=0, atol=0)
