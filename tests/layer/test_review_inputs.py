"""Hostile review of FusedMoE's input rules and weight_loader conventions (docs/design.md §10.2, §10.3):
wrong shapes and dtypes raise naming the argument and the layer (eagerly and under torch.compile), vLLM's
calling convention with a weight name that looks like a shard id, and what an expert id may be."""
import numpy as np
import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE, LoadError, ParallelConfig
from torch_moe_ops.testing import random_moe_weights

E, K, H, I = 5, 2, 96, 32  # odd E, H != I
NAME = "model.layers.1.mlp.experts"


def _loaded(qc=None, dtype=torch.bfloat16):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=dtype)
    layer.layer_name = NAME
    w13, w2, _, _ = random_moe_weights(E, H, I)
    layer.load_weights(w13, w2)
    return layer


def _x(*lead, dtype=torch.bfloat16):
    return torch.randn(*lead, H, dtype=dtype) / 2, torch.randn(*lead, E)


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("call, exc, match", [
    (lambda l, x, g: l(x, g[:, :-1]), ValueError, r"router_logits must be \[\.\.\., E=5\].*got shape \[3, 4\]"),
    (lambda l, x, g: l(x, torch.randn(4, E)), ValueError,
     r"router_logits .*leading dims.*\[3, 96\], got shape \[4, 5\]"),
    (lambda l, x, g: l(x[0], g[0]), ValueError, r"hidden_states must be \[\.\.\., H=96\] with at least one leading"),
    (lambda l, x, g: l(x, g.long()), TypeError, r"router_logits must have dtype in \(bfloat16, float16, float32\)"),
    (lambda l, x, g: l.forward_experts(x, *l.select_experts(g)[:1], l.select_experts(g)[1].short()), TypeError,
     r"topk_ids must have dtype in \(int32, int64\), got torch.int16"),
    (lambda l, x, g: l.forward_experts(x, l.select_experts(g)[0].long(), l.select_experts(g)[1]), TypeError,
     r"topk_weights must have dtype in"),
])
def test_bad_inputs_name_the_argument_and_the_layer(call, exc, match):
    layer = _loaded()
    x, g = _x(3)
    with pytest.raises(exc, match=f"^{NAME}: .*{match}"):
        call(layer, x, g)


@pytest.mark.parametrize("lead", [(0,), (1,), (2, 0), (1, 1)])
def test_empty_and_single_token_batches(lead):
    layer = _loaded(Fp8Config("channel"))
    x, g = _x(*lead)
    out = layer(x, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    if out.numel():
        torch.testing.assert_close(out, layer(x.reshape(-1, H), g.reshape(-1, E)).reshape(x.shape), atol=0, rtol=0)


def test_router_logits_dtype_is_free_and_int64_ids_equal_int32():
    layer = _loaded(dtype=torch.float32)
    x, g = _x(7, dtype=torch.float32)
    out = layer(x, g)
    torch.testing.assert_close(layer(x, g.bfloat16()), layer(x, g.bfloat16().float()), atol=0, rtol=0)
    weights, ids = layer.select_experts(g)
    assert ids.dtype == torch.int32
    torch.testing.assert_close(layer.forward_experts(x, weights, ids.long()), out, atol=0, rtol=0)


def test_compiled_wrong_shapes_still_raise():
    layer = _loaded()
    f = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
    x, g = _x(3)
    torch.testing.assert_close(f(x, g), layer(x, g), atol=0, rtol=0)
    x7, g7 = _x(7)
    torch.testing.assert_close(f(x7, g7), layer(x7, g7), atol=0, rtol=0)
    for bad in ((x7, g7[:6]), (x7, torch.randn(7, E + 1)), (torch.randn(7, H + 1, dtype=torch.bfloat16), g7),
                (x7.reshape(7, 1, H), g7.reshape(1, 7, E))):
        with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
            f(*bad)
    fe = torch.compile(layer.forward_experts, fullgraph=True, dynamic=True, backend="eager")
    w, ids = layer.select_experts(torch.randn(9, E))
    fe(torch.randn(9, H, dtype=torch.bfloat16), w, ids)
    with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
        fe(torch.randn(8, H, dtype=torch.bfloat16), w, ids)
    with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
        fe(torch.randn(9, H, dtype=torch.bfloat16), w, ids[:, :1])


# ------------------------------------------------------------------------------------------ weight_loader
def _w(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(I, H, generator=g) / 10


@pytest.mark.parametrize("call", [
    lambda p, w: p.weight_loader(p, w, "w1", shard_id="w1", expert_id=2, return_success=True),
    lambda p, w: p.weight_loader(p, w, "w1", "w1", 2, True),
    lambda p, w: p.weight_loader(p, w, "w1", "w1", 2),
    lambda p, w: p.weight_loader(p, w, "w13", shard_id="w1", expert_id=2),
])
def test_vllm_weight_name_equal_to_a_shard_id(call):
    """vLLM passes ``weight_name`` third; one that happens to be ``"w1"`` is still the name when a shard id follows."""
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    result = call(layer.w13_weight, _w())
    assert result in (True, None)
    assert ("w13_weight", 2, "w1") not in layer.missing_weights() and ("w13_weight", 2, "w3") in layer.missing_weights()


def test_our_convention_with_a_shard_id_third_is_unchanged():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    layer.layer_name = NAME
    layer.w13_weight.weight_loader(layer.w13_weight, _w(), "w3", 1)
    assert ("w13_weight", 1, "w3") not in layer.missing_weights()
    with pytest.raises(TypeError, match="at most 2 positional arguments"):
        layer.weight_loader(layer.w13_weight, _w(), "w1", 0, True)
    with pytest.raises(TypeError, match=f"{NAME}: weight_loader got shard_id twice"):
        layer.weight_loader(layer.w13_weight, _w(), "name", "w1", shard_id="w1")


@pytest.mark.parametrize("expert_id", [np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)])
def test_integer_like_expert_ids(expert_id):
    layer = FusedMoE(E, K, H, I)
    layer.weight_loader(layer.w13_weight, _w(), "w1", expert_id)
    assert ("w13_weight", 3, "w1") not in layer.missing_weights()


@pytest.mark.parametrize("expert_id", [torch.tensor([3]), torch.tensor([[3]]), torch.tensor(3.0), np.bool_(True),
                                       3.0, "3", np.array([3])])
def test_non_integer_expert_ids_are_refused(expert_id):
    layer = FusedMoE(E, K, H, I)
    layer.layer_name = NAME
    with pytest.raises(TypeError, match=rf"{NAME}: expert_id must be an int .*0-dim integer tensor, got"):
        layer.weight_loader(layer.w13_weight, _w(), "w1", expert_id=expert_id)
    assert layer.load_state == "fresh"


def test_another_ep_ranks_expert_returns_false_and_records_nothing(monkeypatch):
    monkeypatch.setattr(ParallelConfig, "check_group", lambda self: None)  # no process group: the loader alone
    layer = FusedMoE(6, K, H, I, quant_config=Fp8Config("channel"), parallel=ParallelConfig(ep_size=2, ep_rank=1))
    assert layer.local_expert_range == (3, 6)
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    assert layer.weight_loader(layer.w13_weight, _w(), name, shard_id="w1", expert_id=0, return_success=True) is False
    assert layer.load_state == "fresh"
    assert layer.weight_loader(layer.w13_weight, _w(), name, shard_id="w1", expert_id=4, return_success=True) is True
    with pytest.raises(LoadError, match="loaded twice"):  # its own rank's experts are checked
        layer.weight_loader(layer.w13_weight, _w(), name, shard_id="w1", expert_id=4, return_success=True)
