"""Pre-quantized fp8 checkpoints through ``load_checkpoint`` (``checkpoint/formats.py``, docs/design.md §11,
docs/online-quantization.md "Pre-quantized fp8 checkpoints"): a safetensors fp8 checkpoint end to end, and the
checkpoint's format named when a layer refuses its pieces (scales into an unquantized model, another fp8
granularity or block size)."""
import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint

from tests.fp8_checkpoints import BLOCK, CONFIGS, E, H, I, K, checkpoint, quantize, weights
from tests.moe_models import MoEModel


def test_scales_into_an_unquantized_model_name_the_layer_and_config():
    ws = weights()
    model = MoEModel(1, E, K, H, I)
    with pytest.raises(TypeError, match=r"checkpoint tensor 'model.layers.0.mlp.experts.0.gate_proj.weight': "
                                        r"layers.0.experts: w13_weight expert 0 shard 'w1': a pre-quantized "
                                        r"float8_e4m3fn weight .*quant_config is None.*nothing was written"):
        load_checkpoint(model, checkpoint(ws, BLOCK), progress=False)
    scales_only = {k: v for k, v in checkpoint(ws, BLOCK).items() if k.endswith("weight_scale_inv")}
    with pytest.raises(TypeError, match=r"'model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv': "
                                        r"layers.0.experts: w13_weight_scale: a weight scale .*quant_config is None"):
        load_checkpoint(model, scales_only, progress=False)


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_end_to_end_safetensors_fp8_checkpoint(tmp_path, scheme):
    """A tiny fp8 checkpoint (DeepSeek block 128x128 ``weight_scale_inv``, or compressed-tensors ``weight_scale``)
    saved with safetensors and read by load_checkpoint: forward is bitwise the layer assigned the same q and
    scales, the dequantized weights are within fp8's resolution of the float ones (SQNR > 30 dB: e4m3 keeps 3
    mantissa bits, about 31.5 dB here; a wrong scale reading, e.g. its inverse or a wrong tile, is far below 0
    dB), and the output is within the fp8 pipeline's error of the float model (> 20 dB, docs/design.md §13;
    about 24 dB here: the activations are quantized per token as well)."""
    from safetensors.torch import save_file

    qc = Fp8Config("block") if scheme == "block" else CONFIGS[scheme]  # the default 128 x 128 tile
    E_, H_, I_ = 5, 200, 128  # I a multiple of 128 (gate/up tiles apart), H not (partial tiles)
    ws = weights(7, E=E_, H=H_, I=I_)
    sd = checkpoint(ws, qc, input_scales=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = MoEModel(1, E_, K, H_, I_, quant_config=qc, params_dtype=torch.float32)
    report = load_checkpoint(model, str(tmp_path), progress=False)
    assert finalize_loading(model) == {"layers.0.experts": "loaded"}
    ignored = [n for n in report.ignored if n.endswith("input_scale")]
    assert len(ignored) == 3 * E_ and "quantizes activations dynamically" in report.ignored[ignored[0]]
    layer = model.layers[0].experts

    assigned = FusedMoE(E_, K, H_, I_, quant_config=qc, params_dtype=torch.float32)
    q = [torch.stack([quantize(w[e], qc)[0] for e in range(E_)]) for w in ws]
    s = [torch.stack([quantize(w[e], qc)[1] for e in range(E_)]) for w in ws]
    assigned.load_state_dict({"w13_weight": torch.cat(q[:2], 1), "w2_weight": q[2],
                              "w13_weight_scale": torch.cat(s[:2], 1), "w2_weight_scale": s[2].reshape(
                                  assigned.w2_weight_scale.shape)})
    x, logits = torch.randn(33, H_), torch.randn(33, E_)
    out = layer(x, logits)
    assert torch.equal(out, assigned(x, logits))

    fmt = qc.quant_scheme.weight
    real13 = fmt.dequantize(layer.w13_weight, layer.w13_weight_scale, qc.block)
    real2 = fmt.dequantize(layer.w2_weight, layer.w2_weight_scale, qc.block)
    assert sqnr(real13, torch.cat(ws[:2], 1)) > 30 and sqnr(real2, ws[2]) > 30
    ref = FusedMoE(E_, K, H_, I_, params_dtype=torch.float32)
    ref.load_weights(torch.cat(ws[:2], 1), ws[2])
    assert sqnr(out, ref(x, logits)) > 20


def sqnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (a - ref).pow(2).sum()).item()


def test_a_refused_fp8_checkpoint_names_its_format():
    """The checkpoint pipeline decides a checkpoint's fp8 format once (checkpoint/formats.py, from_pretrained's
    decision too): load_checkpoint names it when a layer refuses the fp8 pieces; nothing is written."""
    from types import SimpleNamespace

    ws = weights()
    model = MoEModel(1, E, K, H, I)
    with pytest.raises(TypeError, match=r"quant_config is None.*this checkpoint's experts are pre-quantized as "
                                        r"Fp8Config\(scheme='channel'.*; nothing was written$"):
        load_checkpoint(model, checkpoint(ws, CONFIGS["channel"]), progress=False)
    model = MoEModel(1, E, K, H, I, quant_config=CONFIGS["channel"])
    with pytest.raises(ValueError, match=r"scale shape \[\] .*this checkpoint's experts are pre-quantized as "
                                         r"Fp8Config\(scheme='tensor'.*; nothing was written$"):
        load_checkpoint(model, checkpoint(ws, CONFIGS["tensor"]), progress=False)
    with pytest.raises(TypeError, match=r"this checkpoint's experts are fp8 with block scales \(weight_scale_inv\)"):
        load_checkpoint(MoEModel(1, E, K, H, I), checkpoint(ws, BLOCK), progress=False)
    model.config = SimpleNamespace(quantization_config={"weight_block_size": [32, 32]})
    with pytest.raises(ValueError, match=r"pre-quantized as Fp8Config\(scheme='block', block_shape=\(32, 32\)\)"):
        load_checkpoint(model, checkpoint(ws, BLOCK), progress=False)
    assert model.layers[0].experts.load_state == "fresh"


def _gpt_oss_mxfp4(e, h, i):
    """A GPT-OSS-style MXFP4 state dict (``*_blocks`` [E, N, K/32, 16], ``*_scales`` [E, N, K/32], bf16 biases and
    router) made by quantizing a source layer online, and that layer."""
    from torch_moe_ops import Mxfp4Config

    torch.manual_seed(0)
    src = FusedMoE(e, 2, h, i, quant_config=Mxfp4Config(), activation="swigluoai", has_bias=True)
    b13, b2 = torch.randn(e, 2 * i).bfloat16() * 0.1, torch.randn(e, h).bfloat16() * 0.1
    src.load_weights(torch.randn(e, 2 * i, h).bfloat16() * 0.1, torch.randn(e, h, i).bfloat16() * 0.1,
                     w13_bias=b13, w2_bias=b2)
    pre = "model.layers.0.mlp"
    sd = {f"{pre}.gate.weight": torch.randn(e, h).bfloat16(),
          f"{pre}.experts.gate_up_proj_blocks": src.w13_weight.view(e, 2 * i, h // 32, 16).clone(),
          f"{pre}.experts.gate_up_proj_scales": src.w13_weight_scale.clone(), f"{pre}.experts.gate_up_proj_bias": b13,
          f"{pre}.experts.down_proj_blocks": src.w2_weight.view(e, h, i // 32, 16).clone(),
          f"{pre}.experts.down_proj_scales": src.w2_weight_scale.clone(), f"{pre}.experts.down_proj_bias": b2}
    return sd, src


@pytest.mark.parametrize("source", ["dict", "safetensors"])
def test_gpt_oss_mxfp4_blocks_load_bitwise_into_mxfp4_layers(tmp_path, source):
    """``load_checkpoint`` writes GPT-OSS's packed blocks and E8M0 scales as they are (never dequantized), from a
    dict or a safetensors folder (checked from its headers first)."""
    from safetensors.torch import save_file

    from torch_moe_ops import Mxfp4Config

    e, h, i = 4, 64, 32
    sd, src = _gpt_oss_mxfp4(e, h, i)
    if source == "safetensors":
        save_file(sd, str(tmp_path / "model.safetensors"))
    model = MoEModel(1, e, 2, h, i, quant_config=Mxfp4Config(), activation="swigluoai", has_bias=True)
    report = load_checkpoint(model, sd if source == "dict" else str(tmp_path), progress=False)
    finalize_loading(model)
    layer = model.layers[0].experts
    assert len(report.loaded) == len(sd) and not report.ignored
    assert all(torch.equal(getattr(layer, n), getattr(src, n)) for n in ("w13_weight", "w13_weight_scale",
                                                                           "w2_weight", "w2_weight_scale", "w13_bias"))
    x = torch.randn(3, h).bfloat16()
    logits = torch.randn(3, e)
    assert torch.equal(layer(x, logits), src(x, logits))


def test_gpt_oss_mxfp4_blocks_into_another_layer_name_the_config_and_write_nothing():
    e, h, i = 4, 64, 32
    sd, _ = _gpt_oss_mxfp4(e, h, i)
    model = MoEModel(1, e, 2, h, i, activation="swigluoai", has_bias=True)
    router = model.layers[0].gate.weight.clone()
    with pytest.raises(TypeError, match=r"gate_up_proj_(blocks|scales).*(uint8 weights are pre-quantized mxfp4 bytes|"
                                        r"quant_config is None).*nothing was written"):
        load_checkpoint(model, sd, progress=False)
    assert torch.equal(model.layers[0].gate.weight, router) and model.layers[0].experts.load_state == "fresh"
