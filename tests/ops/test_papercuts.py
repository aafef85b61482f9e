"""The papercuts a new user hits first in the ops and the registry (issue 21): one name per scheme (the weight
format's name and the scheme's name are aliases of each other, in ``quantize_weight`` and ``fused_experts``
alike), an unknown name's error lists every name and alias, ``quant_config`` takes a scheme name, and dtype
errors blame the argument most likely wrong."""
import re

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops.schemes.configs import check_quant_config
from torch_moe_ops.schemes import QUANT_SCHEME_ALIASES, QUANT_SCHEMES, WEIGHT_FORMAT_ALIASES, WEIGHT_FORMATS
from torch_moe_ops.testing import sqnr_db

T, E, K, H, I = 8, 4, 2, 256, 128


def _problem(dtype=torch.bfloat16):
    x = torch.randn(T, H, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H) / 10).to(dtype)
    w2 = (torch.randn(E, H, I) / 10).to(dtype)
    weights, ids = moe.topk_route(torch.randn(T, E), K, renormalize=True)
    return x, w13, w2, weights, ids


# ----------------------------------------------------------------------------- one name per scheme


@pytest.mark.parametrize("names", [("int4_w4a16", "int4_group", "int4"), ("int8_w8a16", "int8_channel", "int8")],
                         ids=["int4", "int8"])
def test_quantize_weight_names_of_one_scheme_are_bitwise_equal(names):
    w = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) / 10
    block = [1, 128] if names[0].startswith("int4") else None
    want_q, want_s = moe.quantize_weight(w, names[1], block_shape=block)  # the weight format's own name
    for name in names:
        q, s = moe.quantize_weight(w, name, block_shape=block)
        assert q.dtype == want_q.dtype and torch.equal(q, want_q), name
        assert torch.equal(s, want_s), name


def test_int4_quick_start_works_under_every_name():
    """The README quick start: ``quantize_weight(w, "int4_w4a16", block_shape=[1, 128])`` feeds ``fused_experts``
    under the scheme's name, the weight format's name and the short one, with bit-equal outputs."""
    x, w13, w2, weights, ids = _problem()
    q13, s13 = moe.quantize_weight(w13, "int4_w4a16", block_shape=[1, 128])
    q2, s2 = moe.quantize_weight(w2, "int4_w4a16", block_shape=[1, 128])
    g13, g_s13 = moe.quantize_weight(w13, "int4_group", block_shape=[1, 128])
    assert torch.equal(q13, g13) and torch.equal(s13, g_s13)
    assert q13.dtype == torch.uint8 and q13.shape == (E, 2 * I, H // 2) and s13.shape == (E, 2 * I, H // 128)
    outs = {name: moe.fused_experts(x, q13, q2, weights, ids, quant_scheme=name, w13_scale=s13, w2_scale=s2,
                                    block_shape=[1, 128])
            for name in ("int4_w4a16", "int4_group", "int4")}
    for name, out in outs.items():
        assert torch.equal(out, outs["int4_w4a16"]), name
    ref = moe.fused_experts(x, w13, w2, weights, ids)
    assert sqnr_db(ref.float(), outs["int4_group"].float()) > 10.0  # int4 against bf16: ~17-20 dB here


def test_every_alias_names_a_registered_scheme_both_ways():
    assert set(QUANT_SCHEME_ALIASES.values()) <= set(QUANT_SCHEMES)
    assert set(WEIGHT_FORMAT_ALIASES.values()) <= set(WEIGHT_FORMATS)
    for scheme in QUANT_SCHEMES.values():
        if scheme.quantized:  # a quantized scheme's name is a weight format name, and the format's is a scheme's
            assert moe.schemes.get_weight_format(scheme.name) is scheme.weight
            assert moe.schemes.get_quant_scheme(scheme.weight.name) is scheme


def test_unknown_name_lists_names_and_aliases():
    x, w13, w2, weights, ids = _problem()
    with pytest.raises(ValueError, match=r"scheme must be one of \('fp8_tensor', .*'int4_group'\) "
                                         r"\(or an alias: .*'int4_w4a16' = 'int4_group'.*\), got 'int5'"):
        moe.quantize_weight(w13, "int5")
    with pytest.raises(ValueError, match=r"quant_scheme must be one of \('none', .*'int4_w4a16'\) "
                                         r"\(or an alias: .*'int4_group' = 'int4_w4a16'.*\), got 'fp8'"):
        moe.fused_experts(x, w13, w2, weights, ids, quant_scheme="fp8")


# ----------------------------------------------------------------------------- quant_config takes a scheme name


@pytest.mark.parametrize("name, config", [
    ("fp8_tensor", moe.Fp8Config("tensor")), ("fp8_channel", moe.Fp8Config("channel")),
    ("fp8_block", moe.Fp8Config("block")), ("int8_w8a16", moe.Int8Config()), ("int8", moe.Int8Config()),
    ("int4_w4a16", moe.Int4Config()), ("int4_group", moe.Int4Config()), ("int4", moe.Int4Config()),
    ("none", None)])
def test_quant_config_scheme_name(name, config):
    assert check_quant_config(name) == config
    layer = moe.FusedMoE(E, K, H, I, quant_config=name)
    assert layer.quant_config == config
    if config is not None:
        ref = moe.FusedMoE(E, K, H, I, quant_config=config)
        assert layer.quant_scheme == ref.quant_scheme
        assert {n: (t.dtype, t.shape) for n, t in layer.state_dict().items()} == \
               {n: (t.dtype, t.shape) for n, t in ref.state_dict().items()}


def test_fused_moe_int4_name_equals_int4_config():
    """``FusedMoE(..., quant_config="int4")`` is ``Int4Config()``: same storage, same output bit for bit."""
    from torch_moe_ops.testing import random_moe_weights

    w13, w2, _, _ = random_moe_weights(E, H, I)
    a = moe.FusedMoE(E, K, H, I, quant_config="int4")
    b = moe.FusedMoE(E, K, H, I, quant_config=moe.Int4Config())
    assert a.quant_config == moe.Int4Config(group_size=128)
    for layer in (a, b):
        layer.load_weights(w13, w2)
    for (n, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t, u), n
    x, logits = torch.randn(T, H, dtype=torch.bfloat16), torch.randn(T, E)
    assert torch.equal(a(x, logits), b(x, logits))


def test_quant_config_fp8_alone_and_wrong_types():
    names = r"'none', 'fp8_tensor', 'fp8_channel', 'fp8_block', 'int8_w8a16', 'int4_w4a16'"
    with pytest.raises(ValueError, match=r"quant_config='fp8' is not a scheme name \(fp8 needs a granularity: "
                                         r"'fp8_tensor', 'fp8_channel' or 'fp8_block'\).*one of " + names):
        moe.FusedMoE(E, K, H, I, quant_config="fp8")
    with pytest.raises(ValueError, match=r"quant_config='int5' is not a scheme name; .*one of " + names):
        check_quant_config("int5")
    with pytest.raises(TypeError, match=r"quant_config must be None, a scheme name \(" + names + r"\) or "
                                        r"torch_moe_ops.Fp8Config.*got int"):
        moe.FusedMoE(E, K, H, I, quant_config=3)


# ----------------------------------------------------------------------------- dtype errors blame the right argument


@pytest.mark.parametrize("device", ["cpu", "meta"])  # the fake (meta) path raises the same message
def test_fp16_hidden_states_with_bf16_weights_names_hidden_states(device):
    x, w13, w2, weights, ids = (t.to(device) for t in _problem())
    msg = (r"hidden_states has dtype torch.float16 but the unquantized weights w13/w2 are torch.bfloat16: .*"
           r"cast hidden_states \(hidden_states.to\(torch.bfloat16\)\)")
    with pytest.raises(TypeError, match=msg):
        moe.fused_experts(x.half(), w13, w2, weights, ids)
    with pytest.raises(TypeError, match=msg):
        moe.fused_moe(x.half(), torch.randn(T, E, device=device), w13, w2, K)


def test_mixed_unquantized_weights_blame_the_weight():
    x, w13, w2, weights, ids = _problem()
    with pytest.raises(TypeError, match=r"^w2 must have dtype bfloat16 for quant_scheme='none' "
                                        r"\(hidden_states torch.bfloat16\), got torch.float16$"):
        moe.fused_experts(x, w13, w2.half(), weights, ids)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fp8_weights_without_quant_scheme_ask_for_it(device):
    x, w13, w2, weights, ids = _problem()
    q13, s13 = moe.quantize_weight(w13, "fp8_channel")
    q2, s2 = moe.quantize_weight(w2, "fp8_channel")
    x, q13, q2, s13, s2, weights, ids = (t.to(device) for t in (x, q13, q2, s13, s2, weights, ids))
    msg = (r"w13/w2 have dtype torch.float8_e4m3fn/torch.float8_e4m3fn \(quantized storage\) but quant_scheme='none': "
           r"pass quant_scheme= one of \['fp8_tensor', 'fp8_channel', 'fp8_block'\] with w13_scale and w2_scale")
    with pytest.raises(TypeError, match=re.escape("pass quant_scheme=")):
        moe.fused_experts(x, q13, q2, weights, ids)
    with pytest.raises(TypeError, match=msg):
        moe.fused_experts(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)


def test_int8_weights_without_quant_scheme_name_the_int8_scheme():
    x, w13, w2, weights, ids = _problem()
    q13, _ = moe.quantize_weight(w13, "int8_w8a16")
    q2, _ = moe.quantize_weight(w2, "int8_w8a16")
    with pytest.raises(TypeError, match=r"torch.int8/torch.int8 \(quantized storage\) but quant_scheme='none': "
                                        r"pass quant_scheme= one of \['int8_w8a16'\]"):
        moe.fused_experts(x, q13, q2, weights, ids)


def test_bf16_weights_with_fp8_scheme_suggest_quantize_weight():
    x, w13, w2, weights, ids = _problem()
    s13, s2 = torch.ones(E, 2, 2), torch.ones(E, 2, 1)
    with pytest.raises(TypeError, match=r"^w13 must have dtype float8_e4m3fn for quant_scheme='fp8_block' "
                                        r"\(hidden_states torch.bfloat16\), got torch.bfloat16; quantize it first: "
                                        r"torch_moe_ops.quantize_weight\(w13, 'fp8_block'\)$"):
        moe.fused_experts(x, w13, w2, weights, ids, quant_scheme="fp8_block", w13_scale=s13, w2_scale=s2)
    q13, s13 = moe.quantize_weight(w13, "fp8_block")
    with pytest.raises(TypeError, match=r"^w2 must have dtype float8_e4m3fn .*quantize_weight\(w2, 'fp8_block'\)$"):
        moe.fused_experts(x, q13, w2, weights, ids, quant_scheme="fp8_block", w13_scale=s13, w2_scale=s2)
