"""Dtype errors at the op boundary (``ops/_checks.py``) blame the argument most likely wrong: mixed unquantized
dtypes name hidden_states or the weight, quantized storage without a ``quant_scheme`` asks for the scheme (and
names it), float weights under a quantized scheme suggest ``quantize_weight`` (issue 21)."""
import functools
import re

import pytest
import torch

import torch_moe_ops as moe
from ._data import moe_problem

T, E, K, H, I = 8, 4, 2, 256, 128


_problem = functools.partial(moe_problem, T, E, K, H, I)  # (x, w13, w2, weights, ids); dtype=...


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
