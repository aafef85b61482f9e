"""load_checkpoint decides expert layouts from the model type, never from an ambiguous (square) shape;
Ernie's [1, E] correction bias; transformers v5 in-memory state dicts; legacy per-expert and fused
checkpoints (docs/design.md §11, checkpoint/layouts.py); the files a folder's index names, never Mistral's
consolidated copy (checkpoint/files.py)."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint
from torch_moe_ops.checkpoint.layouts import FORMATS, fused_transposed, model_type_of
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.quantization import Fp8Config

from tests.moe_models import MoEModel, expert_tensors, hf_checkpoint

pytest.importorskip("transformers")
from tests.hf_models import MODELS, first, hf_blocks, make  # noqa: E402
from torch_moe_ops.integrations.transformers.models import plan_block  # noqa: E402


class _Block(nn.Module):
    """A transformers MoE block rebuilt from a FusedMoE: ``{router_attr}`` then ``experts``."""

    def __init__(self, plan, qc=None):
        super().__init__()
        m = plan.moe
        self.router_attr = plan.router_attr
        router = nn.Linear(m["hidden_size"], m["num_experts"], bias=plan.router_bias is not None)
        setattr(self, plan.router_attr, router)
        self.experts = FusedMoE(**m, params_dtype=torch.float32, quant_config=qc)

    def forward(self, x):
        return self.experts(x, getattr(self, self.router_attr)(x))


class _Ours(nn.Module):
    """``model.layers.{L}.mlp`` of FusedMoE blocks mirroring ``hf`` (no config attribute: no model type)."""

    def __init__(self, hf, qc=None):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for block in hf_blocks(hf):
            attr = next(n for d in hf.model.layers for n, m in d.named_children() if m is block)  # mlp, block_sparse_moe
            layer = nn.Module()
            setattr(layer, attr, _Block(plan_block(block), qc))
            self.model.layers.append(layer)
        self.requires_grad_(False)


def _fused_moe(model):
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def _assert_blocks_match(ours, hf, T=13):
    for mine, theirs in zip([next(layer.children()) for layer in ours.model.layers], hf_blocks(hf)):
        x = torch.randn(1, T, theirs_hidden(theirs)) / 2
        with torch.no_grad():
            want = first(theirs(x)).reshape(T, -1)
        torch.testing.assert_close(mine(x.reshape(T, -1)), want, rtol=1e-5, atol=1e-5)


def theirs_hidden(block) -> int:
    return plan_block(block).moe["hidden_size"]


# ------------------------------------------------------------------------------------------ knowledge
def test_formats_match_the_installed_transformers():
    """Each model type's entry against the down_proj shape its transformers module really has (I != H)."""
    assert FORMATS["gpt_oss"].transposed and FORMATS["llama4"].transposed
    for model_type in MODELS:
        hf = make(model_type)
        H = hf.config.get_text_config().hidden_size
        w2 = hf_blocks(hf)[0].experts.down_proj  # [E, H, I], or [E, I, H] transposed
        assert w2.shape[1] != w2.shape[2], model_type
        assert (w2.shape[2] == H) == fused_transposed(model_type), model_type
    assert model_type_of({"model_type": "llava", "text_config": {"model_type": "mixtral"}}) == "mixtral"
    assert model_type_of(SimpleNamespace(model_type="qwen3_next")) == "qwen3_next"  # unknown, kept for messages
    assert model_type_of(None) is None and fused_transposed("qwen3_next") is None


# ------------------------------------------------------------------------------------------ square experts
def test_square_gpt_oss_needs_the_model_type_and_then_loads_transposed(tmp_path):
    hf = make("gpt_oss", intermediate_size=64)  # H = I = 64: down_proj [E, I, H] is square, like the real 2880
    sd = hf.state_dict()
    assert sd["model.layers.0.mlp.experts.down_proj"].shape[1:] == (64, 64)
    ours = _Ours(hf)
    router = ours.model.layers[0].mlp.router.weight.clone()
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.0.mlp.experts.down_proj'.*square "
                                         r".*model_type=.*nothing was written"):
        load_checkpoint(ours, sd, progress=False)
    assert all(m.load_state == "fresh" for m in _fused_moe(ours))  # checked before the first write
    assert torch.equal(ours.model.layers[0].mlp.router.weight, router)
    report = load_checkpoint(ours, sd, model_type="gpt_oss", progress=False)
    finalize_loading(ours)
    assert report.model_type == "gpt_oss"
    _assert_blocks_match(ours, hf)

    # the model's own config, and a folder's config.json, give the model type too
    again = _Ours(hf)
    again.config = hf.config
    assert load_checkpoint(again, sd, progress=False).model_type == "gpt_oss"
    finalize_loading(again)
    _assert_blocks_match(again, hf)
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))  # clone: tied weights
    with pytest.raises(ValueError, match=r"down_proj' \(.*model.safetensors\): square"):
        load_checkpoint(_Ours(hf), str(tmp_path), progress=False)  # no config.json: the file is named
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    folder = _Ours(hf)
    assert load_checkpoint(folder, str(tmp_path), progress=False).model_type == "gpt_oss"
    finalize_loading(folder)
    _assert_blocks_match(folder, hf)


def test_square_mixtral_v5_fused_loads_untransposed():
    hf = make("mixtral", intermediate_size=64)  # down_proj [E, H, I] square
    sd = hf.state_dict()
    with pytest.raises(ValueError, match="square"):
        load_checkpoint(_Ours(hf), sd, progress=False)
    ours = _Ours(hf)
    load_checkpoint(ours, sd, model_type="mixtral", progress=False)
    finalize_loading(ours)
    _assert_blocks_match(ours, hf)
    # knowledge is enforced, not overridden by shapes: GPT-OSS's layout does not fit a Mixtral gate_up_proj
    with pytest.raises(ValueError, match=r"gate_up_proj.*\[E, out, in\] layout, but model type 'gpt_oss' stores"):
        load_checkpoint(_Ours(hf), sd, model_type="gpt_oss", progress=False)


def test_unknown_model_type_argument_is_an_error():
    hf = make("mixtral")
    with pytest.raises(ValueError, match=r"model_type='mixtrall' has no known expert layout; known: \["):
        load_checkpoint(_Ours(hf), hf.state_dict(), model_type="mixtrall", progress=False)


def test_model_config_of_an_unknown_type_is_named_in_the_error():
    hf = make("mixtral")  # gate_up_proj [4, 64, 64]: square
    ours = _Ours(hf)
    ours.config = SimpleNamespace(model_type="qwen3_next")
    with pytest.raises(ValueError, match="model type 'qwen3_next' has no known expert layout"):
        load_checkpoint(ours, hf.state_dict(), progress=False)


# ------------------------------------------------------------------------------------------ in-memory v5
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss", "granitemoe"])
def test_transformers_v5_state_dict_loads_and_matches(model_type):
    hf = make(model_type)
    ours = _Ours(hf)
    report = load_checkpoint(ours, hf.state_dict(), model_type=model_type, progress=False)
    finalize_loading(ours)
    assert sum(report.layers.values()) == sum(1 for n in report.loaded if ".experts." in n)
    assert all(".experts." not in n for n in report.ignored)
    _assert_blocks_match(ours, hf)


def test_ernie_correction_bias_one_group(tmp_path):
    hf = make("ernie4_5_moe")
    sd = hf.state_dict()
    name = "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"
    assert sd[name].shape == (1, 6)
    ours = _Ours(hf)
    report = load_checkpoint(ours, sd, model_type="ernie4_5_moe", progress=False)
    finalize_loading(ours)
    assert name in report.loaded and report.layers["model.layers.1.mlp.experts"] == 3
    layer = ours.model.layers[1].mlp.experts
    assert torch.equal(layer.e_score_correction_bias, sd[name][0])
    ref = FusedMoE(**plan_block(hf_blocks(hf)[1]).moe, params_dtype=torch.float32)
    p = "model.layers.1.mlp."
    ref.load_weights(sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"], e_score_correction_bias=sd[name][0])
    x = torch.randn(9, 64)
    logits = ours.model.layers[1].mlp.gate(x)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), rtol=0, atol=0)

    # the on-disk name (transformers renames it on load), from a folder: the same
    disk = {k.replace("mlp.gate.moe_statics.", "mlp.moe_statics."): v.clone() for k, v in sd.items()}
    save_file(disk, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ernie4_5_moe"}))
    folder = _Ours(hf)
    report = load_checkpoint(folder, str(tmp_path), progress=False)
    finalize_loading(folder)
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in report.loaded
    assert torch.equal(folder.model.layers[1].mlp.experts.e_score_correction_bias, sd[name][0])

    # only a leading 1 is squeezed: two groups is an error naming the tensor, before any write
    bad = dict(sd)
    bad[name] = torch.zeros(2, 6)
    fresh = _Ours(hf)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.gate.moe_statics.e_score_correction_bias'.*"
                                         r"shape \[6\], got \[2, 6\]"):
        load_checkpoint(fresh, bad, model_type="ernie4_5_moe", progress=False)
    assert all(m.load_state == "fresh" for m in _fused_moe(fresh))


# ------------------------------------------------------------------------------------------ other layouts
L, E, K, H, I = 2, 6, 2, 40, 24


def _reference(qc=None):
    model = MoEModel(L, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    for layer, block in enumerate(model.layers):
        w1, w3, w2 = expert_tensors(E, H, I, seed=layer)
        block.experts.load_weights(torch.cat([w1, w3], 1), w2)
        g = torch.Generator().manual_seed(layer + 500)
        block.gate.weight.copy_(torch.randn(E, H, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("style", ["mixtral", "fused"])
@pytest.mark.parametrize("qc", [None, Fp8Config("channel")], ids=["none", "fp8"])
def test_legacy_per_expert_and_fused_3d_load_and_match(style, qc):
    """experts.{e}.w1/w3/w2 and experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I], odd sizes."""
    sd = hf_checkpoint(L, E, H, I, style=style)
    model = MoEModel(L, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_checkpoint(model, sd, model_type="mixtral" if style == "fused" else None, progress=False)
    finalize_loading(model)
    x = torch.randn(11, H)
    torch.testing.assert_close(model(x), _reference(qc)(x), rtol=0, atol=0)


def test_per_expert_weights_are_linear_out_in_never_guessed():
    """``experts.{e}.*.weight`` is an nn.Linear weight: a transposed [in, out] one is refused, not flipped."""
    sd = hf_checkpoint(L, E, H, I, style="mixtral")
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    sd[name] = sd[name].t().contiguous()  # [I, H] instead of [H, I]
    model = MoEModel(L, E, K, H, I, params_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"experts.3.w2.weight.*expert 3 shard 'w2': expected shape \[40, 24\], "
                                         r"got \[24, 40\]"):
        load_checkpoint(model, sd, progress=False)


# ------------------------------------------------------------------------------------------ folder files
def _save_shards(tmp_path, sd, *, index=True):
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for f, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp_path / f))
    if index:
        with open(tmp_path / "model.safetensors.index.json", "w") as fh:
            json.dump({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}, fh)
    return shards


def test_index_is_respected_and_consolidated_is_ignored(tmp_path):
    sd = hf_checkpoint(L, E, H, I, style="mixtral")
    _save_shards(tmp_path, sd)
    # Mistral's consolidated copy (its own names for the same experts) and a stale shard the index does not list
    mistral = {k.replace("model.", "").replace("block_sparse_moe", "feed_forward"): v.contiguous()
               for k, v in sd.items()}
    save_file(mistral, str(tmp_path / "consolidated.safetensors"))
    save_file({"model.layers.0.block_sparse_moe.experts.0.w1.weight": torch.zeros(I, H)},
              str(tmp_path / "model-old.safetensors"))
    model = MoEModel(L, E, K, H, I, params_dtype=torch.float32)
    report = load_checkpoint(model, str(tmp_path), progress=False)
    finalize_loading(model)
    assert set(report.ignored_files) == {"consolidated.safetensors", "model-old.safetensors"}
    assert all("not in model.safetensors.index.json" in why for why in report.ignored_files.values())
    assert "files not read: consolidated.safetensors" in str(report)
    x = torch.randn(5, H)
    torch.testing.assert_close(model(x), _reference()(x), rtol=0, atol=0)

    # no index: every transformers shard, never the consolidated copy (it would give every expert twice)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model-old.safetensors").unlink()
    model = MoEModel(L, E, K, H, I, params_dtype=torch.float32)
    report = load_checkpoint(model, str(tmp_path), progress=False)
    finalize_loading(model)
    assert list(report.ignored_files) == ["consolidated.safetensors"]
    assert "Mistral consolidated" in report.ignored_files["consolidated.safetensors"]
    assert len(report.loaded) == len(sd)
    torch.testing.assert_close(model(x), _reference()(x), rtol=0, atol=0)


def test_broken_indexes(tmp_path):
    from torch_moe_ops.errors import LoadError

    sd = hf_checkpoint(1, E, H, I)
    shards = _save_shards(tmp_path, sd)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    name = next(iter(weight_map))

    def model():
        return MoEModel(1, E, K, H, I, params_dtype=torch.float32)

    index.write_text(json.dumps({"weight_map": {**weight_map, name: "model-00003-of-00003.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names shards that are not in .*model-00003-of-00003.safetensors"):
        load_checkpoint(model(), str(tmp_path), progress=False)
    other = next(f for f in shards if f != weight_map[name])
    index.write_text(json.dumps({"weight_map": {**weight_map, name: other}}))
    with pytest.raises(LoadError, match=rf"'{name}' is listed in {other}, but it is in .*{weight_map[name]}"):
        load_checkpoint(model(), str(tmp_path), progress=False)
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.layers.0.mlp.gate.bias": other}}))
    with pytest.raises(LoadError, match=r"'model.layers.0.mlp.gate.bias' is listed in .*in none of its files"):
        load_checkpoint(model(), str(tmp_path), progress=False)
    index.write_text("{not json")
    with pytest.raises(LoadError, match="model.safetensors.index.json: not a readable safetensors index"):
        load_checkpoint(model(), str(tmp_path), progress=False)
    for f in shards:
        (tmp_path / f).rename(tmp_path / ("consolidated-" + f))
    index.unlink()
    with pytest.raises(FileNotFoundError, match="has only consolidated"):
        load_checkpoint(model(), str(tmp_path), progress=False)


def test_granite_on_disk_names_load_as_fused_experts():
    """Granite-MoE checkpoints on disk name the fused experts ``input_linear`` / ``output_linear``."""
    hf = make("granitemoe")
    sd = {n.replace("experts.gate_up_proj", "input_linear.weight").replace("experts.down_proj", "output_linear.weight"): t
          for n, t in hf.state_dict().items()}
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in sd
    ours = _Ours(hf)
    report = load_checkpoint(ours, sd, model_type="granitemoe", progress=False)
    finalize_loading(ours)
    assert not [n for n in report.ignored if "linear" in n]
    _assert_blocks_match(ours, hf)
