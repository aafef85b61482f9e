"""The weight_loader contract (``layer/loading/loader.py``, docs/design.md §11): names, meta descriptors and
all-experts tensors, transposed exports (square shapes need ``transposed=``), errors naming the param, expert
and shard, and a piece loaded twice before ``finalize_loading``."""
import pytest
import torch

from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.quantization import Fp8Config, LoadError
from torch_moe_ops.testing import random_moe_weights

from tests.moe_models import SCHEMES

E, K, H, I = 8, 2, 64, 48


def test_loader_accepts_names_meta_descriptors_and_3d():
    w13, w2, _, _ = random_moe_weights(E, H, I)
    qc = Fp8Config("channel")
    a = FusedMoE(E, K, H, I, quant_config=qc)
    a.weight_loader("w13_weight", w13, None, None)
    a.weight_loader(a.full_precision["w2_weight"], w2, "w2", None, return_success=True)
    a.finalize_loading()
    b = FusedMoE(E, K, H, I, quant_config=qc)
    b.weight_loader(b.w13_weight, w13[:, :I], "w1", None)  # all experts' gate at once
    b.weight_loader(b.w13_weight, w13[:, I:], "w3", None)
    for e in range(E):
        assert b.weight_loader(b.w2_weight, w2[e], "w2", e, return_success=True) is True
    b.finalize_loading()
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        assert torch.equal(getattr(a, name).view(torch.uint8), getattr(b, name).view(torch.uint8))


@pytest.mark.parametrize("scheme", ["none", "fp8_block"])
def test_loader_recognises_transposed_exports(scheme):
    w13, w2, _, _ = random_moe_weights(E, H, I)
    a, b = (FusedMoE(E, K, H, I, quant_config=SCHEMES[scheme]) for _ in range(2))
    a.load_weights(w13, w2)
    b.weight_loader(b.w13_weight, w13.transpose(1, 2).contiguous(), None, None)  # [E, H, 2I] (GPT-OSS style)
    b.weight_loader(b.w2_weight, w2.transpose(1, 2).contiguous(), "w2", None)  # [E, I, H]
    b.finalize_loading()
    assert torch.equal(a.w13_weight.view(torch.uint8), b.w13_weight.view(torch.uint8))
    assert torch.equal(a.w2_weight.view(torch.uint8), b.w2_weight.view(torch.uint8))


def test_loader_square_shape_needs_explicit_transposed():
    layer = FusedMoE(E, K, 32, 32)
    w2 = torch.randn(32, 32)
    layer.weight_loader(layer.w2_weight, w2, "w2", 0)
    assert torch.equal(layer.w2_weight[0], w2.to(torch.bfloat16))  # ambiguous: taken as [out, in]
    layer.weight_loader(layer.w2_weight, w2, "w2", 1, transposed=True)
    assert torch.equal(layer.w2_weight[1], w2.t().to(torch.bfloat16))


@pytest.mark.parametrize("scheme", ["none", "fp8_tensor"])
def test_wrong_shape_names_param_expert_and_shard(scheme):
    layer = FusedMoE(E, K, H, I, quant_config=SCHEMES[scheme])
    layer.layer_name = "model.layers.3.mlp.experts"
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.experts: w13_weight expert 5 shard 'w3': expected shape \[48, 64\]"):
        layer.weight_loader(layer.w13_weight, torch.randn(I + 1, H), "w3", 5)
    with pytest.raises(ValueError, match=r"w2_weight expert 2 shard 'w2'.*got \[64, 47\]"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I - 1), "w2", 2)
    with pytest.raises(ValueError, match=r"E=8 first"):
        layer.weight_loader(layer.w2_weight, torch.randn(E - 1, H, I), "w2", None)
    assert layer.load_state == "fresh"  # a rejected tensor is not counted as loaded


def test_loader_argument_errors():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config(), activation="silu_no_mul")
    with pytest.raises(ValueError, match="no w3"):
        layer.weight_loader(layer.w13_weight, torch.randn(I, H), "w3", 0)
    with pytest.raises(ValueError, match="does not belong"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I), "w1", 0)
    with pytest.raises(ValueError, match="shard_id must be one of"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I), "down", 0)
    with pytest.raises(ValueError, match=r"expert_id must be an int in \[0, 8\)"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I), "w2", 8)
    with pytest.raises(ValueError, match="cannot load 'w13_bias'"):
        layer.weight_loader("w13_bias", torch.randn(I), "w1", 0)
    with pytest.raises(ValueError, match="param must be one of"):
        layer.weight_loader(torch.empty(1), torch.randn(H, I), "w2", 0)
    with pytest.raises(TypeError, match="pre-quantized"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I).to(torch.float8_e5m2), "w2", 0)
    with pytest.raises(LoadError, match="meta device"):
        FusedMoE(E, K, H, I, device="meta").weight_loader("w2_weight", torch.randn(H, I), "w2", 0)


def test_double_load_before_finalize_is_an_error():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config())
    layer.weight_loader(layer.w13_weight, torch.randn(I, H), "w1", 3)
    with pytest.raises(LoadError, match=r"w13_weight expert 3 shard 'w1' was loaded twice before finalize_loading"):
        layer.weight_loader(layer.w13_weight, torch.randn(I, H), "w1", 3)
    layer.weight_loader(layer.w2_weight, torch.randn(H, I), "w2", 3)
    with pytest.raises(LoadError, match="loaded twice"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I), "w2", 3)
    w13, _, _, _ = random_moe_weights(E, H, I)
    with pytest.raises(LoadError, match="loaded twice"):  # a fused gate_up overlapping a loaded gate
        layer.weight_loader(layer.w13_weight, w13, None, None)
