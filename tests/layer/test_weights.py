"""FusedMoE's loading API (``layer/weights.py``, docs/design.md §10.3): ``weight_loader``'s two calling conventions
(vLLM's and ours) load the same bytes, a weight name that looks like a shard id, convention errors, and what an
expert id may be (also another EP rank's expert)."""
import numpy as np
import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE, LoadError, ParallelConfig
from torch_moe_ops.checkpoint import finalize_loading
from torch_moe_ops.testing import random_moe_weights

from ._layer import CONFIGS, NAME, E, H, I, K


# ------------------------------------------------------------------------------------ 1. calling conventions
def _ckpt(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(I, H, generator=g) / 10, torch.randn(I, H, generator=g) / 10,
             torch.randn(H, I, generator=g) / 10) for _ in range(E)]


def _load_each(layer, call, seed=0):
    for e, (w1, w3, w2) in enumerate(_ckpt(seed)):
        for shard, hf, w in (("w1", "gate_proj", w1), ("w3", "up_proj", w3), ("w2", "down_proj", w2)):
            param = layer.w2_weight if shard == "w2" else layer.w13_weight
            call(param, w, f"model.layers.0.mlp.experts.{e}.{hf}.weight", shard, e)
    finalize_loading(layer)
    return layer


CALLS = {  # the call shapes of vLLM model code (Mixtral / Qwen2-MoE / DeepSeek load_weights) and ours
    "vllm_keywords": lambda p, w, n, s, e: p.weight_loader(p, w, n, shard_id=s, expert_id=e),
    "vllm_return_success": lambda p, w, n, s, e: _true(p.weight_loader(p, w, n, shard_id=s, expert_id=e,
                                                                       return_success=True)),
    "vllm_positional": lambda p, w, n, s, e: p.weight_loader(p, w, n, s, e),
    "vllm_positional_success": lambda p, w, n, s, e: _true(p.weight_loader(p, w, n, s, e, True)),
    "ours_positional": lambda p, w, n, s, e: p.weight_loader(p, w, s, e),
    "ours_keywords": lambda p, w, n, s, e: p.weight_loader(p, w, shard_id=s, expert_id=e, weight_name=n),
}


def _true(result):
    assert result is True


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "int4"])
@pytest.mark.parametrize("convention", list(CALLS))
def test_weight_loader_calling_conventions_load_the_same_bytes(scheme, convention):
    qc = CONFIGS[scheme]
    ref = _load_each(FusedMoE(E, K, H, I, quant_config=qc), lambda p, w, n, s, e: p.weight_loader(p, w, s, e))
    layer = _load_each(FusedMoE(E, K, H, I, quant_config=qc), CALLS[convention])
    assert layer.is_loaded
    for a, b in zip(ref.parameters(), layer.parameters()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_weight_loader_convention_errors():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    layer.layer_name = NAME
    w2 = torch.randn(H, I)
    with pytest.raises(TypeError, match=f"{NAME}: weight_loader's third argument must be a shard id .* got int"):
        layer.weight_loader(layer.w2_weight, w2, 3, 0)
    with pytest.raises(TypeError, match="shard_id twice"):
        layer.weight_loader(layer.w2_weight, w2, "w2", 0, shard_id="w2")
    with pytest.raises(TypeError, match="expert_id twice"):
        layer.weight_loader(layer.w2_weight, w2, "x.down_proj.weight", "w2", 0, expert_id=0)
    with pytest.raises(TypeError, match="weight_name twice"):
        layer.weight_loader(layer.w2_weight, w2, "x.down_proj.weight", weight_name="y", shard_id="w2", expert_id=0)
    with pytest.raises(TypeError, match="at most 2 positional arguments"):
        layer.weight_loader(layer.w2_weight, w2, "w2", 0, True)
    with pytest.raises(ValueError, match="expected shape .* \\(checkpoint tensor 'x.experts.0.down_proj.weight'\\)"):
        layer.weight_loader(layer.w2_weight, w2[:, :-1], "x.experts.0.down_proj.weight", shard_id="w2", expert_id=0)
    assert layer.load_state == "fresh"  # nothing of the failed calls was recorded
    # "w13" is a shard id: a fused gate_up, positionally in our convention
    w13, _, _, _ = random_moe_weights(E, H, I, dtype=torch.float32)
    layer.weight_loader(layer.w13_weight, w13[0], "w13", 0)
    assert layer.missing_weights()[0] == ("w2_weight", 0, "w2")


# ------------------------------------------------------------------------------------ 2. shard and expert ids
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
