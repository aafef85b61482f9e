"""Scheme names resolve once, in the registry (``schemes/_lookup.py``, docs/design.md §3): one name per scheme
(the weight format's name and the scheme's name are aliases of each other, in ``quantize_weight`` and
``fused_experts`` alike), and an unknown name's error lists every name and alias (issue 21)."""
import functools

import pytest
import torch

import torch_moe_ops as moe
from tests.ops._data import moe_problem
from torch_moe_ops.schemes import QUANT_SCHEME_ALIASES, QUANT_SCHEMES, WEIGHT_FORMAT_ALIASES, WEIGHT_FORMATS
from torch_moe_ops.testing import sqnr_db

T, E, K, H, I = 8, 4, 2, 256, 128


_problem = functools.partial(moe_problem, T, E, K, H, I)  # (x, w13, w2, weights, ids); dtype=...


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
    with pytest.raises(ValueError, match=r"scheme must be one of \('fp8_tensor', .*'int4_group'.*\) "
                                         r"\(or an alias: .*'int4_w4a16' = 'int4_group'.*\), got 'int5'"):
        moe.quantize_weight(w13, "int5")
    with pytest.raises(ValueError, match=r"quant_scheme must be one of \('none', .*'int4_w4a16'.*\) "
                                         r"\(or an alias: .*'int4_group' = 'int4_w4a16'.*\), got 'fp8'"):
        moe.fused_experts(x, w13, w2, weights, ids, quant_scheme="fp8")
