"""``from_pretrained``: every model from a ``save_pretrained`` folder equals the model it was saved from; quantized
loads equal ``patch`` with the same config; pre-quantized fp8 checkpoints load bit-exactly; files are chosen
by the index; the experts' staging stays within one or two experts."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from torch_moe_ops import Fp8Config, Int8Config, quantize_weight

from tests.hf_models import MODELS, make, nbytes, our_blocks, patched_copy, peak_bytes

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _load(path, quant_config=None, **kw):
    from torch_moe_ops.integrations.transformers import from_pretrained

    return from_pretrained(path, quant_config, progress=False, **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(model_type, dtype=torch.float32):
        if (model_type, dtype) not in cache:
            torch.manual_seed(len(cache) + 7)
            model = make(model_type).to(dtype)
            path = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(path)
            cache[model_type, dtype] = (model, str(path))
        return cache[model_type, dtype]

    return get


@pytest.mark.parametrize("model_type", MODELS)
def test_loads_like_the_saved_model(saved, model_type):
    model, path = saved(model_type)
    ours = _load(path)
    report = ours.torch_moe_ops_report
    assert type(ours) is type(model) and not ours.training
    assert len(report.replaced) == len(our_blocks(ours)) >= 1 and not report.skipped
    assert report.loading["files"] == ["model.safetensors"] and not report.loading["hf_missing_keys"]
    ids = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "granitemoe", "deepseek_v3", "ernie4_5_moe",
                                        "llama4_text"])
def test_quantized_load_equals_patch(saved, model_type):
    """Streaming quantization of the checkpoint = quantizing the model transformers loads: the same bits."""
    from transformers import AutoModelForCausalLM

    _, path = saved(model_type, torch.bfloat16)
    qc = Fp8Config("channel") if model_type == "gpt_oss" else Int8Config()
    ours = _load(path, qc)
    patched, _ = patched_copy(AutoModelForCausalLM.from_pretrained(path).eval(), qc)
    assert ours.torch_moe_ops_report.quant_scheme == qc.quant_scheme.name
    for a, b in zip(our_blocks(ours), our_blocks(patched)):
        assert torch.equal(a.experts.w13_weight.view(torch.uint8), b.experts.w13_weight.view(torch.uint8))
        assert torch.equal(a.experts.w2_weight_scale, b.experts.w2_weight_scale)
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(_logits(ours, ids), _logits(patched, ids))


def test_default_dtype_is_the_checkpoints(saved):
    model, path = saved("qwen3_moe", torch.bfloat16)
    ours = _load(path)
    assert ours.dtype == torch.bfloat16 and our_blocks(ours)[0].experts.w13_weight.dtype == torch.bfloat16
    assert _load(path, dtype=torch.float32).dtype == torch.float32


def _prequantize(path, out, scheme):
    """Rewrite a checkpoint's per-expert weights as fp8 with DeepSeek / compressed-tensors scale names."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    q_sd = {}
    for name, t in sd.items():
        if ".experts." in name and name.endswith("_proj.weight"):
            q, s = quantize_weight(t.float(), f"fp8_{scheme}", block_shape=[128, 128] if scheme == "block" else None)
            q_sd[name] = q
            suffix = "weight_scale_inv" if scheme == "block" else "weight_scale"
            q_sd[name[: -len("weight")] + suffix] = s.reshape(()) if scheme == "tensor" else s
        else:
            q_sd[name] = t
    os.makedirs(out, exist_ok=True)
    save_file(q_sd, os.path.join(out, "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        with open(os.path.join(path, f)) as src, open(os.path.join(out, f), "w") as dst:
            dst.write(src.read())


@pytest.mark.parametrize("scheme", ["block", "tensor", "channel"])
def test_prequantized_fp8_loads_as_is(tmp_path, scheme):
    """A fp8 checkpoint (block scales weight_scale_inv [ceil(N/128), ceil(K/128)], or weight_scale per tensor /
    channel) loads its values unchanged: equal to quantizing the bf16 model online with the same scheme."""
    from transformers import AutoModelForCausalLM

    make("deepseek_v3", moe_intermediate_size=128).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _prequantize(str(tmp_path / "bf16"), str(tmp_path / "fp8"), scheme)
    qc = Fp8Config(scheme, block_shape=(128, 128))
    ours = _load(tmp_path / "fp8")
    assert ours.torch_moe_ops_report.loading["prequantized"] == str(qc)
    patched, _ = patched_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval(), qc)
    for a, b in zip(our_blocks(ours), our_blocks(patched)):
        assert a.experts.quant_scheme == f"fp8_{scheme}"
        assert torch.equal(a.experts.w13_weight.view(torch.uint8), b.experts.w13_weight.view(torch.uint8))
        assert torch.equal(a.experts.w13_weight_scale, b.experts.w13_weight_scale)
        assert torch.equal(a.experts.w2_weight_scale, b.experts.w2_weight_scale)
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(_logits(ours, ids), _logits(patched, ids))
    assert torch.equal(_load(tmp_path / "fp8", qc)(ids).logits, _logits(ours, ids))  # the same config is accepted


def test_index_is_respected_and_consolidated_ignored(saved, tmp_path):
    model, path = saved("mixtral")
    sd = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / f))
    with open(tmp_path / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}, fh)
    # Mistral's consolidated copy: other names, same data; reading it would double-load or fail
    save_file({"layers.0.feed_forward.experts.0.w1.weight": torch.zeros(3)}, str(tmp_path / "consolidated.safetensors"))
    save_file({"junk": torch.zeros(3)}, str(tmp_path / "model-old.safetensors"))
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_text(open(os.path.join(path, f)).read())
    ours = _load(tmp_path)
    loading = ours.torch_moe_ops_report.loading
    assert loading["files"] == sorted(shards)
    assert any(f.startswith("consolidated.safetensors") for f in loading["ignored_files"])
    assert any(f.startswith("model-old.safetensors") for f in loading["ignored_files"])
    ids = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    os.remove(tmp_path / "model.safetensors.index.json")
    os.remove(tmp_path / "model-old.safetensors")  # no index: every non-consolidated file is read
    assert _load(tmp_path).torch_moe_ops_report.loading["files"] == sorted(shards)


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_staging_stays_within_two_experts(tmp_path, quantized):
    """Everything allocated beyond the final experts is transient (freed at the end): one expert's staging and
    a transient copy; quantized on CPU, the reference quantizer's fp32 workspace (two fp32 copies of the
    projection being quantized, 2 x 2/3 expert here) comes on top. A layer held in full precision (8 experts)
    would fail either bound."""
    model = make("mixtral", hidden_size=128, intermediate_size=256, num_local_experts=8)
    model.save_pretrained(tmp_path)
    expert = 3 * 128 * 256 * 4
    qc = Fp8Config("tensor") if quantized else None
    ours, peak, net = peak_bytes(lambda: _load(tmp_path, qc))
    experts = nbytes(p for b in our_blocks(ours) for p in b.experts.parameters())
    mapped = os.path.getsize(tmp_path / "model.safetensors")  # the safetensors mmap counts as one allocation
    assert net <= mapped + experts + 64 * 1024
    assert peak - net <= (3 if quantized else 2) * expert
    ids = torch.randint(0, 96, (1, 5))
    if not quantized:
        torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_peak_within_final_plus_two_experts(tmp_path):
    model = make("qwen3_moe", hidden_size=256, moe_intermediate_size=512, num_experts=16).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    expert = 3 * 256 * 512 * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours = _load(tmp_path, Fp8Config("tensor"), device="cuda")
    final = torch.cuda.memory_allocated() - base
    assert torch.cuda.max_memory_allocated() - base <= final + 2 * expert + (64 << 20)
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    assert torch.isfinite(ours(ids).logits).all()


def _gpt_oss_mxfp4_folder(model, path):
    """``model``'s GPT-OSS checkpoint as the Hub ships it: experts as MXFP4 ``*_blocks`` [E, N, K/32, 16] and E8M0
    ``*_scales`` (quantized here by the OCP rule), ``quantization_config.quant_method = "mxfp4"``; returns the
    same model with its experts replaced by their dequantized values (what the checkpoint means, in bf16)."""
    from torch_moe_ops import reference

    model.save_pretrained(path)
    sd = load_file(os.path.join(path, "model.safetensors"))
    with torch.no_grad():
        for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            w = sd.pop(name).transpose(1, 2).contiguous()  # HF stores [E, in, out]: the blocks are [E, out, in]
            q, s = quantize_weight(w, "mxfp4")
            E, N, K = w.shape
            sd[name + "_blocks"], sd[name + "_scales"] = q.view(E, N, K // 32, 16), s
            model.get_parameter(name).copy_(reference.dequantize_weight(q, s, "mxfp4").transpose(1, 2))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router"]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return model


def test_gpt_oss_mxfp4_folder_stays_mxfp4(tmp_path):
    """A GPT-OSS MXFP4 folder loads with its experts packed as stored (blocks and scales bitwise, ~0.27x the
    bf16 bytes) and computes what the checkpoint means: the bf16 model on the dequantized experts (bf16 noise)."""
    torch.manual_seed(11)
    model = _gpt_oss_mxfp4_folder(make("gpt_oss").to(torch.bfloat16), str(tmp_path))
    ours = _load(str(tmp_path))
    report = ours.torch_moe_ops_report
    assert report.quant_scheme == "mxfp4" and report.loading["prequantized"] == "Mxfp4Config()"
    sd = load_file(os.path.join(tmp_path, "model.safetensors"))
    for i, block in enumerate(our_blocks(ours)):
        pre = f"model.layers.{i}.mlp.experts."
        assert torch.equal(block.experts.w13_weight, sd[pre + "gate_up_proj_blocks"].flatten(-2))
        assert torch.equal(block.experts.w2_weight_scale, sd[pre + "down_proj_scales"])
    assert report.expert_bytes_after < 0.4 * sum(t.numel() * 2 for t in model.parameters() if t.dim() == 3)
    ids = torch.randint(0, 96, (2, 9))
    want, got = _logits(model, ids).float(), _logits(ours, ids).float()
    assert ((got - want).norm() / want.norm()) < 2e-2
    with pytest.raises(ValueError, match=r"pre-quantized as Mxfp4Config\(\).*quant_config=None or Mxfp4Config\(\)"):
        _load(str(tmp_path), Int8Config())
    # transformers' own reading of the folder (its MXFP4 dequantizer): the same logits to bf16 noise
    import transformers

    if not hasattr(transformers, "Mxfp4Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Mxfp4Config")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16).eval()
    theirs = _logits(hf, ids).float()
    assert ((got - theirs).norm() / theirs.norm()) < 2e-2


@pytest.mark.cuda
def test_cuda_gpt_oss_mxfp4_load_peak_within_final_plus_two_experts(tmp_path):
    """Packed blocks and scales go to the GPU as stored: no bf16 expert is ever built there, so the peak stays
    within the final model plus two packed experts (benchmarks/load_peak.py measures the GPT-OSS-20B size)."""
    torch.manual_seed(5)
    model = make("gpt_oss", hidden_size=256, intermediate_size=512, num_local_experts=16).to(torch.bfloat16)
    _gpt_oss_mxfp4_folder(model, str(tmp_path))
    expert = 3 * 256 * 512 // 2 + 3 * 256 * 512 // 32  # packed bytes + E8M0 scales of one expert
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours = _load(str(tmp_path), device="cuda")
    final = torch.cuda.memory_allocated() - base
    assert ours.torch_moe_ops_report.quant_scheme == "mxfp4"
    assert torch.cuda.max_memory_allocated() - base <= final + 2 * expert + (64 << 20)
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    assert torch.isfinite(ours(ids).logits).all()
