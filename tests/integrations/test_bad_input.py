"""Bad input: each is a clear error or a report line naming the module and the reason; nothing silently skipped;
no block ever half-replaced."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torch_moe_ops import Int4Config, Int8Config, LoadError, Fp8Config

from tests.hf_models import H, first, hf_blocks, make, our_blocks

pytest.importorskip("transformers")

from torch_moe_ops.integrations import transformers as tmo  # noqa: E402


def _load(path, quant_config=None, **kw):
    return tmo.from_pretrained(path, quant_config, progress=False, **kw)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------ patch
def test_model_without_moe_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM contains no sparse-MoE block"):
        tmo.patch(dense)


class _CustomMoE(nn.Module):
    """An MoE block nobody wrote a planner for."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, 4, bias=False)
        self.experts = nn.ModuleList([nn.Linear(H, H) for _ in range(4)])

    def forward(self, x):
        return x


def test_unsupported_blocks_are_named_and_left_alone():
    from transformers.activations import ACT2FN

    model = make("mixtral")
    odd = model.model.layers[0].mlp
    odd.experts.act_fn = ACT2FN["quick_gelu"]  # no torch_moe_ops activation computes it
    custom = model.model.layers[1].mlp = _CustomMoE()
    with pytest.warns(UserWarning, match="NOT replaced"):
        report = tmo.patch(model)
    assert model.model.layers[0].mlp is odd and model.model.layers[1].mlp is custom
    assert "QuickGELUActivation" in report.skipped["model.layers.0.mlp"]
    assert "no torch_moe_ops planner for _CustomMoE" in report.skipped["model.layers.1.mlp"]
    assert not report.replaced and "NOT replaced model.layers.0.mlp" in str(report)
    model2 = make("mixtral")
    model2.model.layers[1].mlp.experts.act_fn = ACT2FN["quick_gelu"]
    state = _state(model2)
    with pytest.raises(tmo.Unsupported, match="model.layers.1.mlp.*QuickGELU"):
        tmo.patch(model2, strict=True)
    assert _same_state(model2, state) and not our_blocks(model2)  # strict: nothing replaced either


def test_block_missing_its_expert_tensors_is_unsupported():
    model = make("qwen3_moe")
    del model.model.layers[0].mlp.experts.gate_up_proj  # e.g. replaced by another library's quantized module
    with pytest.warns(UserWarning):
        report = tmo.patch(model)
    assert "has no tensor 'gate_up_proj'" in report.skipped["model.layers.0.mlp"]
    assert list(report.replaced) == ["model.layers.1.mlp"]


def test_quant_config_the_model_cannot_take_changes_nothing():
    model = make("olmoe")  # I = 48: not a multiple of the int4 group 32
    state = _state(model)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    msg = r"model.layers.0.mlp \(OlmoeSparseMoeBlock\).*Int4Config.*divisible by the group size 32"
    with pytest.raises(ValueError, match=msg):
        tmo.patch(model, Int4Config(group_size=32))
    assert _same_state(model, state) and len(hf_blocks(model)) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_failure_while_converting_leaves_that_block_whole(monkeypatch):
    """The second block fails after its layer was built: it stays the transformers block, tensors intact."""
    import importlib

    patch_mod = importlib.import_module("torch_moe_ops.integrations.transformers.patch")

    model = make("gpt_oss")  # transposed experts: the float path transposes in place, so test both paths
    ref = copy.deepcopy(model)
    calls = []
    real = patch_mod.quantize_experts

    def flaky(plan, qc, dev):
        calls.append(plan)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")
        return real(plan, qc, dev)

    monkeypatch.setattr(patch_mod, "quantize_experts", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        tmo.patch(model, Int8Config())
    assert isinstance(model.model.layers[0].mlp, tmo.MoEBlock)
    second, ref_second = model.model.layers[1].mlp, ref.model.layers[1].mlp
    assert type(second).__name__ == "GptOssMLP"
    for (n, a), (_, b) in zip(second.named_parameters(), ref_second.named_parameters()):
        assert torch.equal(a, b), n
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(first(second(x)), first(ref_second(x)))


def test_patching_twice_is_a_no_op():
    model = make("mixtral")
    tmo.patch(model)
    report = tmo.patch(model)
    assert not report.replaced and "already torch_moe_ops MoEBlocks" in report.notes[0]


# ------------------------------------------------------------------------------------------ from_pretrained
@pytest.fixture
def checkpoint(tmp_path):
    def write(model_type="qwen3_moe", edit=None, **overrides):
        model = make(model_type, **overrides)
        model.save_pretrained(tmp_path)
        if edit is not None:
            sd = load_file(tmp_path / "model.safetensors")
            edit(sd)
            save_file(sd, tmp_path / "model.safetensors")
        return str(tmp_path)

    return write


def test_from_pretrained_of_a_dense_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM .*llama.* has no MoE block"):
        _load(tmp_path)


def test_missing_experts_are_named(checkpoint):
    def drop(sd):
        del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
        del sd["model.layers.1.mlp.experts.5.down_proj.weight"]

    with pytest.raises(LoadError, match=r"model.layers.1.mlp.experts.*2 missing: expert 3: w3 .*expert 5: w2"):
        _load(checkpoint(edit=drop))


def test_extra_experts_are_refused(checkpoint):
    def extra(sd):
        sd["model.layers.0.mlp.experts.6.gate_proj.weight"] = torch.zeros(32, H)

    with pytest.raises(LoadError, match=r"experts.6.gate_proj.weight is expert 6, but the model has 6 experts"):
        _load(checkpoint(edit=extra))


def test_experts_of_a_layer_without_moe_block_are_refused(checkpoint):
    def stray(sd):
        sd["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, H)

    # DeepSeek-V3's layer 0 is dense (first_k_dense_replace=1)
    with pytest.raises(LoadError, match=r"model.layers.0.mlp.experts.0.gate_proj.weight .* no MoE block there"):
        _load(checkpoint("deepseek_v3", edit=stray))


def test_wrong_expert_shape_names_the_tensor(checkpoint):
    def bad(sd):
        sd["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(H, 31)

    with pytest.raises(ValueError, match=r"experts.2.down_proj.weight \(model.safetensors\).*expert 2 shard 'w2'"):
        _load(checkpoint(edit=bad))


def test_mxfp4_blocks_mixed_with_float_experts_or_without_scales_are_refused(checkpoint):
    def mixed(sd):
        sd["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 64, 2, 16, dtype=torch.uint8)

    with pytest.raises(LoadError, match=r"model.layers.0.mlp: MXFP4 expert blocks mixed with other expert weights"):
        _load(checkpoint("gpt_oss", edit=mixed))

    def no_scales(sd):
        for proj in ("gate_up_proj", "down_proj"):
            w = sd.pop(f"model.layers.0.mlp.experts.{proj}")
            sd[f"model.layers.0.mlp.experts.{proj}_blocks"] = torch.zeros(w.shape[0], w.shape[2], w.shape[1] // 32, 16,
                                                                          dtype=torch.uint8)

    with pytest.raises(LoadError, match=r"MXFP4 experts' down_proj_scales is missing"):
        _load(checkpoint("gpt_oss", edit=no_scales))


def test_missing_router_weights_are_an_error(checkpoint):
    path = checkpoint(edit=lambda sd: sd.pop("model.layers.1.mlp.gate.weight"))
    with pytest.raises(LoadError, match=r"lacks 1 non-expert weights.*model.layers.1.mlp.gate.weight"):
        _load(path)
    with pytest.warns(UserWarning, match="1 non-expert weights missing"):
        model = _load(path, strict=False)
    assert any("missing" in n for n in model.torch_moe_ops_report.notes)


def test_prequantized_checkpoint_with_another_quant_config(tmp_path):
    from .test_from_pretrained import _prequantize

    make("deepseek_v3", moe_intermediate_size=128).save_pretrained(tmp_path / "bf16")
    _prequantize(str(tmp_path / "bf16"), str(tmp_path / "fp8"), "block")
    with pytest.raises(ValueError, match=r"pre-quantized as Fp8Config\(scheme='block'.*Int8Config"):
        _load(tmp_path / "fp8", Int8Config())


def test_fp8_block_scales_that_do_not_tile_w13(tmp_path):
    from .test_from_pretrained import _prequantize

    make("deepseek_v3", moe_intermediate_size=96).save_pretrained(tmp_path / "bf16")  # 96 % 128 != 0
    _prequantize(str(tmp_path / "bf16"), str(tmp_path / "fp8"), "block")
    with pytest.raises(ValueError, match="intermediate_size I=96 is not a multiple of the block's 128 rows"):
        _load(tmp_path / "fp8")
    with pytest.raises(ValueError, match="pre-quantized"):
        _load(tmp_path / "fp8", Fp8Config("tensor"))


def test_bad_paths(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _load(tmp_path / "nowhere")
    path = checkpoint()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {"x": "model-00002-of-00002.safetensors"}}, fh)
    with pytest.raises(FileNotFoundError, match="names shards that are not in"):
        _load(path)


def test_files_are_read_by_the_one_reader(tmp_path, checkpoint):
    """from_pretrained reads through load_checkpoint's safetensors reader (torch_moe_ops/checkpoint/files.py):
    a tensor the index places in another file, and a corrupt file, are LoadErrors naming them."""
    path = checkpoint()
    names = list(load_file(os.path.join(path, "model.safetensors")))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {**{n: "model.safetensors" for n in names}, "x": "model.safetensors"}}, fh)
    with pytest.raises(LoadError, match=r"checkpoint tensor 'x' is listed in model.safetensors, but it is in none"):
        _load(path)
    os.remove(os.path.join(path, "model.safetensors.index.json"))
    with open(os.path.join(path, "model.safetensors"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(LoadError, match=r"model.safetensors: not a readable safetensors file"):
        _load(path)


def test_meta_model_is_refused():
    from transformers import AutoModelForCausalLM

    from tests.hf_models import config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config("mixtral"))
    with pytest.raises(ValueError, match="on the meta device.*from_pretrained"):
        tmo.patch(model)
    assert not our_blocks(model)
