"""Failed loads never lose or corrupt data and bad values never hide (docs/online-quantization.md, "Failed
loads"): weight_loader / load_weights refusals, safetensors folders (all or nothing, corrupt files), tears."""
import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import save_file

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.errors import LoadError, TornWeightsError
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.layer.loading import WeightLoader
from torch_moe_ops.quantization import Fp8Config, Int8WeightOnlyConfig
from torch_moe_ops.testing import random_moe_weights

from tests.moe_models import MoEModel, hf_checkpoint, loaded_model

E, K, H, I = 3, 2, 64, 32
L = 2


def _bad_calls(layer):
    """(description, weight_loader args, expected exception, regex) for calls that must change nothing."""
    nan = torch.randn(I, H)
    nan[5, 7] = float("nan")
    inf_all = torch.randn(E, H, I)
    inf_all[2, 1, 3] = float("-inf")
    return [
        ("meta tensor", (layer.w13_weight, torch.empty(I, H, device="meta"), "w1", 1), ValueError,
         r"w13_weight expert 1 shard 'w1': the tensor is on the meta device"),
        ("bool expert_id", (layer.w2_weight, torch.randn(H, I), "w2", True), TypeError, "expert_id must be an int"),
        ("bool tensor expert_id", (layer.w2_weight, torch.randn(H, I), "w2", torch.tensor(False)), TypeError,
         "expert_id must be an int"),
        ("float expert_id", (layer.w2_weight, torch.randn(H, I), "w2", 1.0), TypeError, "expert_id must be an int"),
        ("expert out of range", (layer.w2_weight, torch.randn(H, I), "w2", E), ValueError, r"in \[0, 3\)"),
        ("wrong shape", (layer.w13_weight, torch.randn(I, H + 1), "w3", 2), ValueError,
         r"w13_weight expert 2 shard 'w3': expected shape \[32, 64\]"),
        ("wrong dtype", (layer.w2_weight, torch.randn(H, I).to(torch.int8), "w2", 0), TypeError, "bf16/fp16/fp32"),
        ("NaN", (layer.w13_weight, nan, "w3", 1), ValueError,
         r"w13_weight expert 1 shard 'w3': non-finite values \(first at index \[5, 7\]: nan\)"),
        ("-Inf in an all-experts tensor", (layer.w2_weight, inf_all, "w2", None), ValueError,
         r"w2_weight expert 2 shard 'w2': non-finite values \(first at index \[2, 1, 3\]: -inf\)"),
    ]


@pytest.mark.parametrize("qc", [None, Fp8Config("block", block_shape=(32, 32))], ids=["none", "fp8_block"])
@pytest.mark.parametrize("stage", ["fresh", "loading", "loaded"])
def test_failed_weight_loader_call_records_and_writes_nothing(qc, stage):
    w13, w2, _, _ = random_moe_weights(E, H, I)
    layer = FusedMoE(E, K, H, I, quant_config=qc)
    layer.layer_name = "model.layers.4.mlp.experts"
    if stage == "loading":
        layer.weight_loader(layer.w13_weight, w13[2, :I], "w1", 2)  # expert 2 half staged
    elif stage == "loaded":
        layer.load_weights(w13, w2)
    state, missing, staging = layer.load_state, layer.missing_weights(), layer.staging_bytes
    before = {n: t.view(torch.uint8).clone() for n, t in layer.state_dict().items()}
    for what, args, exc, regex in _bad_calls(layer):
        with pytest.raises(exc, match=regex):
            layer.weight_loader(*args)
        assert (layer.load_state, layer.missing_weights(), layer.staging_bytes) == (state, missing, staging), what
    assert all(torch.equal(t.view(torch.uint8), before[n]) for n, t in layer.state_dict().items())
    if stage == "fresh":  # the pieces that failed were never recorded: finalize names them
        for e in range(E):
            layer.weight_loader(layer.w13_weight, w13[e], None, e)
        with pytest.raises(LoadError, match=r"3 missing: expert 0: w2 \(w2_weight\); expert 1: w2"):
            layer.finalize_loading()


def test_load_weights_is_all_or_nothing():
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True)
    layer = FusedMoE(E, K, H, I, has_bias=True, use_correction_bias=True, quant_config=Int8WeightOnlyConfig())
    bias = torch.rand(E)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2, e_score_correction_bias=bias)
    before = {n: t.view(torch.uint8).clone() for n, t in layer.state_dict().items()}
    bad = bias.clone()
    bad[1] = float("nan")
    w13_b, w2_b, _, _ = random_moe_weights(E, H, I)
    with pytest.raises(ValueError, match=r"e_score_correction_bias: non-finite values \(first at index \[1\]"):
        layer.load_weights(w13_b, w2_b, w13_bias=b13, w2_bias=b2, e_score_correction_bias=bad)
    with pytest.raises(LoadError, match=r"load_weights: reload incomplete: 10 missing: e_score_correction_bias"):
        layer.load_weights(w13_b, w2_b)  # would leave biases and routing bias of the old set: refused up front
    assert all(torch.equal(t.view(torch.uint8), before[n]) for n, t in layer.state_dict().items())
    assert layer.load_state == "loaded"


def test_correction_bias_nan_through_a_checkpoint_names_it():
    sd = hf_checkpoint(L, E, H, I, correction_bias=True)
    sd["model.layers.1.mlp.gate.e_score_correction_bias"][2] = float("inf")
    model = MoEModel(L, E, K, H, I, use_correction_bias=True, scoring_func="sigmoid")
    with pytest.raises(ValueError, match=r"layers\.1\.experts: e_score_correction_bias: non-finite .*\[2\]: inf"):
        load_checkpoint(model, sd, progress=False)
    assert all(layer.load_state == "fresh" for layer in model.layers.modules() if isinstance(layer, FusedMoE))


def _save_folder(path, sd):
    """Two files; the second also holds the router weights."""
    first = {k: v.contiguous() for k, v in sd.items() if ".layers.0." in k and "gate.weight" not in k}
    save_file(first, str(path / "model-00001-of-00002.safetensors"))
    rest = {k: v.contiguous() for k, v in sd.items() if k not in first}
    save_file(rest, str(path / "model-00002-of-00002.safetensors"))


@pytest.mark.parametrize("fault", ["nan", "shape", "dtype", "missing", "header_before_data"])
def test_folder_reload_is_all_or_nothing(tmp_path, fault):
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, num_layers=L, E=E, H=H, I=I, quant_config=Fp8Config("channel"))
    before = {n: t.view(torch.uint8).clone() for n, t in model.state_dict().items()}
    last = "model.layers.1.mlp.experts.2.down_proj.weight"  # the last tensor of the last file
    first = "model.layers.0.mlp.experts.0.gate_proj.weight"
    if fault in ("nan", "header_before_data"):
        b[last if fault == "nan" else first][3, 4] = float("nan")
    if fault in ("shape", "header_before_data"):
        b[last] = torch.randn(H, I + 1)
    if fault == "dtype":
        b[last] = b[last].to(torch.float8_e4m3fn)
    if fault == "missing":
        del b[last]
    _save_folder(tmp_path, b)
    expected = {"nan": r"non-finite values \(first at index \[3, 4\]", "shape": r"expected shape \[64, 32\]",
                "dtype": "pre-quantized", "missing": r"layers\.1\.experts: reload incomplete: 1 missing: expert 2: w2",
                "header_before_data": r"expected shape \[64, 32\]"}[fault]  # headers are checked before any data
    with pytest.raises((ValueError, TypeError, LoadError), match=expected) as err:
        reload_weights(model, str(tmp_path))
    assert "nothing was written" in str(err.value)
    if fault not in ("missing",):
        assert "model-00002-of-00002.safetensors" in str(err.value) or fault == "header_before_data"
    assert all(torch.equal(t.view(torch.uint8), before[n]) for n, t in model.state_dict().items())
    assert all(layer.load_state == "loaded" for layer in model.modules() if isinstance(layer, FusedMoE))


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty", "header_only"])
def test_corrupt_safetensors_file_names_itself(tmp_path, corruption):
    sd = hf_checkpoint(L, E, H, I)
    _save_folder(tmp_path, sd)
    path = tmp_path / "model-00002-of-00002.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:-100], "garbage": b"\x07not a safetensors file" * 9, "empty": b"",
                      "header_only": raw[:8]}[corruption])
    model = MoEModel(L, E, K, H, I)
    with pytest.raises(LoadError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors file"):
        load_checkpoint(model, str(tmp_path), progress=False)
    with pytest.raises(LoadError, match=r"model-00002-of-00002\.safetensors"):
        load_checkpoint(model, str(path), progress=False)
    assert all(layer.load_state == "fresh" for layer in model.modules() if isinstance(layer, FusedMoE))


def test_tensor_in_two_files_is_refused(tmp_path):
    sd = hf_checkpoint(1, E, H, I)
    _save_folder(tmp_path, sd)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    save_file({name: sd[name].contiguous()}, str(tmp_path / "model-00003-of-00003.safetensors"))
    with pytest.raises(LoadError, match=r"'model\.layers\.0\.mlp\.experts\.1\.up_proj\.weight' is in two files"):
        load_checkpoint(MoEModel(1, E, K, H, I), str(tmp_path), progress=False)


def test_write_failure_after_checks_tears_and_reload_heals(monkeypatch):
    """A failure the checks cannot foresee (here: the 5th quantization raises, as an OOM would) tears the
    layers written so far; forward refuses naming the failure; a complete reload heals."""
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, num_layers=L, E=E, H=H, I=I, quant_config=Fp8Config())
    x = torch.randn(7, H, dtype=torch.bfloat16)
    with torch.no_grad():
        out_a = model(x)
    calls, real = [], WeightLoader._quantize

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, *args)

    monkeypatch.setattr(WeightLoader, "_quantize", flaky)
    with pytest.raises(RuntimeError, match="simulated") as err:
        reload_weights(model, b)
    if hasattr(err.value, "add_note"):  # the type is kept; Python >= 3.11 adds what happened as a note
        assert "are torn" in "".join(err.value.__notes__)
    layer0, layer1 = model.layers[0].experts, model.layers[1].experts
    assert layer0.is_torn and layer0.load_state == "torn" and not layer0.is_loaded
    assert layer1.is_torn  # never reached, but the router of layer 0 changed: the model as a whole is torn
    with pytest.raises(TornWeightsError, match=r"layers\.0\.experts: weights are torn: reload round 2 failed: at "
                                               r"checkpoint tensor .*experts\.2\.up_proj.*simulated"):
        model(x)
    monkeypatch.setattr(WeightLoader, "_quantize", real)
    assert reload_weights(model, a).layer_status == {"layers.0.experts": "reloaded", "layers.1.experts": "reloaded"}
    with torch.no_grad():
        assert torch.equal(model(x), out_a)


def test_write_failure_in_a_first_load_records_nothing(monkeypatch):
    """The piece whose write raised is not counted as loaded: finalize names it (no silent empty slot)."""
    w13, w2, _, _ = random_moe_weights(E, H, I)
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    real = WeightLoader._quantize

    def fail_on_w2_of_expert_1(self, targets, name, e, w):
        if name == "w2_weight" and e == 1:
            raise RuntimeError("device error (simulated)")
        return real(self, targets, name, e, w)

    monkeypatch.setattr(WeightLoader, "_quantize", fail_on_w2_of_expert_1)
    for e in range(E):
        layer.weight_loader(layer.w13_weight, w13[e], None, e)
        if e == 1:
            with pytest.raises(RuntimeError, match="simulated"):
                layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
        else:
            layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
    assert layer.missing_weights() == [("w2_weight", 1, "w2")] and layer.load_state == "loading"
    with pytest.raises(LoadError, match=r"1 missing: expert 1: w2 \(w2_weight\)"):
        layer.finalize_loading()
    monkeypatch.setattr(WeightLoader, "_quantize", real)
    layer.weight_loader(layer.w2_weight, w2[1], "w2", 1)  # the retry is no "loaded twice"
    assert layer.finalize_loading() == "loaded"


def test_first_load_from_a_broken_stream_starts_over():
    """A generator that fails midway in a first load resets the layers it wrote into: forward refuses naming
    the failure, and the whole (fixed) source can be sent again without 'loaded twice' errors."""
    sd = hf_checkpoint(L, E, H, I)
    bad = dict(sd)
    bad["model.layers.1.mlp.experts.0.up_proj.weight"] = torch.randn(I + 1, H)
    model = MoEModel(L, E, K, H, I, quant_config=Fp8Config("channel"))
    with pytest.raises(ValueError, match=r"expert 0 shard 'w3': expected shape") as err:
        load_checkpoint(model, (item for item in bad.items()), progress=False)
    assert "are torn" in str(err.value)
    layers = [b.experts for b in model.layers]
    assert [layer.load_state for layer in layers] == ["fresh", "fresh"] and layers[0].staging_bytes == 0
    with pytest.raises(LoadError, match=r"not loaded \(fresh; the last load failed: the first load failed: at "
                                        r"checkpoint tensor 'model\.layers\.1\.mlp\.experts\.0\.up_proj"):
        model(torch.randn(3, H, dtype=torch.bfloat16))
    load_checkpoint(model, (item for item in sd.items()), progress=False)
    assert finalize_loading(model) == {"layers.0.experts": "loaded", "layers.1.experts": "loaded"}


def test_failed_finalize_of_a_weight_loader_reload_tears():
    a, b = hf_checkpoint(1, E, H, I, seed=1), hf_checkpoint(1, E, H, I, seed=2)
    model = loaded_model(a, num_layers=1, E=E, H=H, I=I)
    layer = model.layers[0].experts
    layer.weight_loader(layer.w2_weight, b["model.layers.0.mlp.experts.0.down_proj.weight"], "w2", 0)
    assert layer.load_state == "reloading" and layer.is_loaded  # a round in progress still serves
    with pytest.raises(TornWeightsError, match="reload incomplete: 8 missing"):
        finalize_loading(model)
    assert layer.load_state == "torn"
    with pytest.raises(TornWeightsError, match="failed at finalize_loading"):
        model(torch.randn(2, H, dtype=torch.bfloat16))
    with pytest.raises(LoadError, match="a torn layer heals only with a complete set"):
        reload_weights(model, {k: v for k, v in b.items() if ".experts.0." in k}, strict=False)
    reload_weights(model, b)
    assert layer.load_state == "loaded"


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_forward_refuses_a_torn_layer_without_recompiling_after_heal(fullgraph):
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, num_layers=L, E=E, H=H, I=I)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph)
    x = torch.randn(5, H, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        out_a = compiled(x)
        bad = dict(b)
        bad["model.layers.1.mlp.experts.1.up_proj.weight"] = torch.full((I, H), float("nan"))
        with pytest.raises(ValueError, match="non-finite"):
            reload_weights(model, iter(bad.items()))
        # the ready flag is a guard: the torn model is retraced and refuses (fullgraph: Dynamo's error carries ours)
        with pytest.raises(LoadError if not fullgraph else RuntimeError, match="weights are torn"):
            compiled(x)
        frames = counter.frame_count
        reload_weights(model, iter(a.items()))
        assert torch.equal(compiled(x), out_a)  # healed: the first graph's guards hold again
    assert counter.frame_count == frames
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_checkpoint_nan_is_caught_at_load():
    w13, w2, _, _ = random_moe_weights(E, H, I, device="cuda")
    w2[1, 3, 2] = float("nan")
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config(), device="cuda")
    where = r"w2_weight expert 1 shard 'w2': non-finite values \(first at index \[1, 3, 2\]: nan\)"
    with pytest.raises(ValueError, match=where):  # a device tensor: checked at load time (one sync per tensor)
        layer.load_weights(w13, w2)
    assert layer.load_state == "fresh"
