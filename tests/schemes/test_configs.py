"""Layer quant configs (``schemes/configs.py``): ``quant_config`` takes a scheme name (or an alias) and gives
the config object, ``FusedMoE(..., quant_config="int4")`` is ``Int4Config()``, and a bare ``"fp8"`` or a wrong
type is refused naming every scheme (issue 21)."""
import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops.schemes.configs import check_quant_config

T, E, K, H, I = 8, 4, 2, 256, 128


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
    names = r"'none', 'fp8_tensor', 'fp8_channel', 'fp8_block', 'int8_w8a16', 'int4_w4a16', 'mxfp4'"
    with pytest.raises(ValueError, match=r"quant_config='fp8' is not a scheme name \(fp8 needs a granularity: "
                                         r"'fp8_tensor', 'fp8_channel' or 'fp8_block'\).*one of " + names):
        moe.FusedMoE(E, K, H, I, quant_config="fp8")
    with pytest.raises(ValueError, match=r"quant_config='int5' is not a scheme name; .*one of " + names):
        check_quant_config("int5")
    with pytest.raises(TypeError, match=r"quant_config must be None, a scheme name \(" + names + r"\) or "
                                        r"torch_moe_ops.Fp8Config.*got int"):
        moe.FusedMoE(E, K, H, I, quant_config=3)
