"""load_checkpoint: Hugging Face name mapping (also a bare layer's own names), sources, progress bar, report
(docs/design.md §11)."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.checkpoint import LoadReport, finalize_loading, load_checkpoint
from torch_moe_ops.quantization import Fp8Config

from tests.moe_models import MoEModel, expert_tensors, hf_checkpoint, moe_layers

L, E, K, H, I = 2, 8, 2, 64, 48


def _x(T=9):
    return torch.randn(T, H, dtype=torch.bfloat16) / 2


def _direct(style_sd_seed=0, qc=None, **kw):
    """The model loaded without name mapping: load_weights with the per-layer tensors."""
    model = MoEModel(L, E, K, H, I, quant_config=qc, **kw)
    for layer, block in enumerate(model.layers):
        w1, w3, w2 = expert_tensors(E, H, I, seed=style_sd_seed * 1000 + layer)
        block.experts.load_weights(torch.cat([w1, w3], 1), w2)
        g = torch.Generator().manual_seed(style_sd_seed * 1000 + layer + 500)
        block.gate.weight.copy_(torch.randn(E, H, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("style", ["qwen", "mixtral", "fused"])
@pytest.mark.parametrize("qc", [None, Fp8Config("channel")], ids=["none", "fp8"])
def test_hf_names(style, qc):
    sd = hf_checkpoint(L, E, H, I, style=style)
    model = MoEModel(L, E, K, H, I, quant_config=qc)
    report = load_checkpoint(model, sd, progress=False)
    assert finalize_loading(model) == {"layers.0.experts": "loaded", "layers.1.experts": "loaded"}
    per_layer = 2 if style == "fused" else 3 * E
    assert report.layers == {"layers.0.experts": per_layer, "layers.1.experts": per_layer}
    block = "block_sparse_moe" if style == "mixtral" else "mlp"
    assert report.other == {f"model.layers.{i}.{block}.gate.weight": f"layers.{i}.gate.weight" for i in range(L)}
    assert report.ignored == {} and len(report.loaded) == len(sd)
    assert report.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    x = _x()
    torch.testing.assert_close(model(x), _direct(qc=qc)(x), atol=0, rtol=0)


def test_folder_of_safetensors_with_shards_split_across_files(tmp_path):
    """Gates in one file, ups and downs in another: natural-order reading still streams expert by expert."""
    sd = hf_checkpoint(L, E, H, I, dtype=torch.bfloat16)
    first = {k: v.contiguous() for k, v in sd.items() if "gate_proj" in k}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: v.contiguous() for k, v in sd.items() if k not in first},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    model = MoEModel(L, E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)))
    report = load_checkpoint(model, str(tmp_path), progress=False)
    finalize_loading(model)
    assert len(report.loaded) == len(sd) and not report.ignored
    for layer in moe_layers(model):
        assert layer.peak_staging_bytes <= 2 * I * H * 2  # one expert's w13 staging at a time
    ref = MoEModel(L, E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)))
    load_checkpoint(ref, sd, progress=False)
    finalize_loading(ref)
    x = _x()
    torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    single = tmp_path / "model-00002-of-00002.safetensors"
    assert len(load_checkpoint(MoEModel(L, E, K, H, I), str(single), progress=False).loaded) == len(sd) - len(first)


def test_generator_source_and_progress_bar(capsys):
    sd = hf_checkpoint(L, E, H, I)
    model = MoEModel(L, E, K, H, I)
    report = load_checkpoint(model, ((k, v) for k, v in sd.items()), progress=True)
    finalize_loading(model)
    assert len(report.loaded) == len(sd)
    assert "Loading weights" in capsys.readouterr().err
    text = str(report)
    assert text.startswith(f"loaded {len(sd)} tensors") and "into 2 FusedMoE layers" in text


def test_ignored_names_are_reported():
    sd = hf_checkpoint(L, E, H, I)
    sd["model.embed_tokens.weight"] = torch.randn(10, H)
    sd["model.layers.5.mlp.experts.0.gate_proj.weight"] = torch.randn(I, H)  # no 6th layer in the model
    sd["layers.0.experts.w13_weight"] = torch.randn(E, 2 * I, H)  # our own state-dict name
    model = MoEModel(L, E, K, H, I)
    report = load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    assert report.ignored["model.embed_tokens.weight"] == "no matching parameter or buffer in the model"
    assert "no FusedMoE" in report.ignored["model.layers.5.mlp.experts.0.gate_proj.weight"]
    assert "weight_loader" in report.ignored["layers.0.experts.w13_weight"]
    assert "ignored 3" in str(report)


def test_shape_mismatch_in_checkpoint_raises():
    sd = hf_checkpoint(L, E, H, I)
    sd["model.layers.1.mlp.experts.4.down_proj.weight"] = torch.randn(H, I + 2)
    with pytest.raises(ValueError, match=r"layers.1.experts: w2_weight expert 4 shard 'w2': expected shape \[64, 48\]"):
        load_checkpoint(MoEModel(L, E, K, H, I), sd, progress=False)
    sd = hf_checkpoint(L, E, H, I)
    sd["model.layers.0.mlp.gate.weight"] = torch.randn(E + 1, H)
    with pytest.raises(ValueError, match="does not match layers.0.gate.weight"):
        load_checkpoint(MoEModel(L, E, K, H, I), sd, progress=False)


class _Mlp(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False, dtype=torch.bfloat16)
        self.up_proj = nn.Linear(H, I, bias=False, dtype=torch.bfloat16)
        self.down_proj = nn.Linear(I, H, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_deepseek_correction_bias_and_shared_experts():
    """``mlp.gate.e_score_correction_bias`` -> FusedMoE; ``mlp.shared_experts.*`` -> its shared_experts."""
    sd = hf_checkpoint(L, E, H, I, correction_bias=True)
    for layer in range(L):
        for n, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            sd[f"model.layers.{layer}.mlp.shared_experts.{n}.weight"] = torch.randn(shape) / 10
    model = MoEModel(L, E, K, H, I, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
                     use_correction_bias=True, routed_scaling_factor=2.5, quant_config=Fp8Config())
    for block in model.layers:
        block.experts.shared_experts = _Mlp(H, I).requires_grad_(False)
    report = load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    assert not report.ignored
    assert report.layers["layers.0.experts"] == 3 * E + 1
    assert report.other["model.layers.1.mlp.shared_experts.down_proj.weight"] == \
        "layers.1.experts.shared_experts.down_proj.weight"
    torch.testing.assert_close(model.layers[1].experts.e_score_correction_bias,
                               sd["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert model(_x()).isfinite().all()


class _HFLikeModel(nn.Module):
    """Module paths mirror the checkpoint (``model.layers.{L}.mlp.{router,experts}``): names resolve exactly."""

    def __init__(self, layers, **kw):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.mlp = nn.Module()
            block.mlp.router = nn.Linear(H, E, dtype=torch.bfloat16)
            block.mlp.experts = FusedMoE(E, K, H, I, **kw)
            self.model.layers.append(block)
        self.requires_grad_(False)


def test_gpt_oss_style_fused_transposed_interleaved_with_biases():
    """GPT-OSS exports gate_up_proj [E, H, 2I] (interleaved gate/up) and down_proj [E, I, H], with ``_bias``."""
    sd = {}
    for layer in range(L):
        sd[f"model.layers.{layer}.mlp.router.weight"] = torch.randn(E, H)
        sd[f"model.layers.{layer}.mlp.router.bias"] = torch.randn(E)
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.randn(E, H, 2 * I) / 10
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj_bias"] = torch.randn(E, 2 * I) / 10
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.randn(E, I, H) / 10
        sd[f"model.layers.{layer}.mlp.experts.down_proj_bias"] = torch.randn(E, H) / 10
    model = _HFLikeModel(L, activation="swigluoai", has_bias=True, quant_config=Fp8Config("channel"))
    report = load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    assert not report.ignored and len(report.other) == 2 * L
    experts = model.model.layers[1].mlp.experts
    ref = FusedMoE(E, K, H, I, activation="swigluoai", has_bias=True, quant_config=Fp8Config("channel"))
    p = "model.layers.1.mlp.experts."
    ref.load_weights(sd[p + "gate_up_proj"].transpose(1, 2), sd[p + "down_proj"].transpose(1, 2),
                     w13_bias=sd[p + "gate_up_proj_bias"], w2_bias=sd[p + "down_proj_bias"])
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w13_bias", "w2_bias"):
        assert torch.equal(getattr(experts, name).view(torch.uint8), getattr(ref, name).view(torch.uint8))


def test_non_gated_up_proj_loads_as_w1():
    sd = hf_checkpoint(L, E, H, I, gated=False)
    sd["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(I, H)
    model = MoEModel(L, E, K, H, I, activation="relu2_no_mul", quant_config=Fp8Config())
    report = load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    assert "non-gated" in report.ignored["model.layers.0.mlp.experts.0.gate_proj.weight"]
    w1, _, _ = expert_tensors(E, H, I, gated=False, seed=0)
    ref = FusedMoE(E, K, H, I, activation="relu2_no_mul", quant_config=Fp8Config())
    ref.weight_loader("w13_weight", w1, "w1", None)
    assert torch.equal(model.layers[0].experts.w13_weight.view(torch.uint8), ref.w13_weight.view(torch.uint8))


def test_single_layer_root_model():
    sd = {k: v for k, v in hf_checkpoint(1, E, H, I).items()}
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config())
    report = load_checkpoint(layer, sd, progress=False)
    assert finalize_loading(layer) == {"": "loaded"}
    assert report.layers == {"": 3 * E}
    assert list(report.ignored) == ["model.layers.0.mlp.gate.weight"]  # the router is not the layer's


def test_model_without_fused_moe_is_an_error():
    with pytest.raises(ValueError, match="contains no torch_moe_ops.FusedMoE"):
        load_checkpoint(nn.Linear(2, 2), {}, progress=False)
    with pytest.raises(ValueError, match="contains no torch_moe_ops.FusedMoE"):
        finalize_loading(nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(MoEModel(L, E, K, H, I), "/nonexistent/folder", progress=False)


def test_report_type():
    assert isinstance(load_checkpoint(MoEModel(1, E, K, H, I), {}, progress=False), LoadReport)


def test_bare_layer_state_names_without_prefix_load():
    """``load_checkpoint(layer, {"experts.0.gate_proj.weight": ...})``: names relative to a bare FusedMoE."""
    from torch_moe_ops import FusedMoE, finalize_loading, load_checkpoint

    E_, H_, I_ = 3, 16, 8
    w13, w2 = torch.randn(E_, 2 * I_, H_), torch.randn(E_, H_, I_)
    sd = {}
    for e in range(E_):
        sd[f"experts.{e}.gate_proj.weight"] = w13[e, :I_]
        sd[f"experts.{e}.up_proj.weight"] = w13[e, I_:]
        sd[f"experts.{e}.down_proj.weight"] = w2[e]
    layer = FusedMoE(E_, 2, H_, I_, params_dtype=torch.float32, device="cpu")
    report = load_checkpoint(layer, sd, progress=False)
    finalize_loading(layer)
    assert not report.ignored and torch.equal(layer.w13_weight, w13) and torch.equal(layer.w2_weight, w2)
