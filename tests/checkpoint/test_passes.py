"""The passes of a model-level load (``checkpoint/passes.py``; docs/online-quantization.md, "Failed loads"): failed
loads never lose or corrupt data and bad values never hide.

Fault injection, a bad tensor at EVERY position: from a source that can be read again (dict, list of pairs) a
failed reload writes nothing: weights, scales, biases, the correction bias and the router stay bitwise intact and
forward gives the old output. From a one-shot iterator a failure after the first write tears the model (forward
raises naming the failed reload) until a later complete reload heals it. Every outcome is counted and the counts
are checked. Then the single cases: safetensors folders (all or nothing, corrupt files, a tensor in two files),
write failures the checks cannot foresee, a broken first-load stream, torn layers under torch.compile, and an
error that says "nothing was written" once.
"""
import re
from collections import Counter

import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import save_file

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.errors import LoadError, TornWeightsError
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.layer.loading import WeightLoader
from torch_moe_ops.quantization import Fp8Config, Int4Config, Int8WeightOnlyConfig

from tests.moe_models import MoEModel, hf_checkpoint, loaded_model, moe_layers

E, K, H, I, T = 3, 2, 64, 32, 5
L = 2
SCHEMES = {"none": None, "fp8_tensor": Fp8Config("tensor"), "fp8_block": Fp8Config("block", block_shape=(32, 32)),
           "int8_w8a16": Int8WeightOnlyConfig(), "int4_w4a16": Int4Config(32)}
FAULTS = ("shape", "dtype", "prequantized", "nan", "inf", "meta", "missing")
#: the stream test heals with a full reload after every tear: the issue's five kinds (the others fail the same
#: per-tensor check, covered from re-readable sources and by the single cases below)
STREAM_FAULTS = ("shape", "dtype", "nan", "inf", "missing")
P = "model.layers.0.mlp."
_PIECE = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}


# ------------------------------------------------------------------------------------------ every fault, everywhere
def checkpoint(seed: int) -> dict:
    """20 tensors: router, correction bias, then per expert gate/up/down weights and biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {P + "gate.weight": torch.randn(E, H, generator=g) / 4,
          P + "gate.e_score_correction_bias": torch.rand(E, generator=g)}
    for e in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            sd[f"{P}experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g) / 10
            sd[f"{P}experts.{e}.{proj}.bias"] = torch.randn(shape[0], generator=g) / 10
    return sd


def build(qc, sd):
    model = MoEModel(1, E, K, H, I, quant_config=qc, has_bias=True, use_correction_bias=True, scoring_func="sigmoid")
    load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    return model


def inject(sd: dict, pos: int, fault: str, seed: int) -> dict:
    bad = dict(sd)
    name = list(sd)[pos]
    t = sd[name]
    if fault == "missing":
        del bad[name]
    elif fault == "shape":
        bad[name] = torch.randn(*t.shape[:-1], t.shape[-1] + 1)
    elif fault == "dtype":
        bad[name] = (t * 100).to(torch.int32)
    elif fault == "prequantized":
        bad[name] = t.to(torch.float8_e4m3fn)
    elif fault == "meta":
        bad[name] = torch.empty_like(t, device="meta")
    else:  # one NaN or one +-Inf somewhere in the tensor
        g = torch.Generator().manual_seed(seed)
        t = t.clone()
        t.view(-1)[torch.randint(t.numel(), (1,), generator=g)] = float("nan") if fault == "nan" else \
            float("inf") * (1 if seed % 2 else -1)
        bad[name] = t
    return bad


def expected_error(name: str, fault: str) -> str:
    """A regex the error must match: the bad tensor's name, or for a missing one the piece it leaves out."""
    if fault != "missing":
        return "checkpoint tensor " + repr(name).replace(".", r"\.")
    if name.endswith("e_score_correction_bias"):
        return r"1 missing: e_score_correction_bias"
    e, proj, kind = name.split(".")[-3:]
    param, shard = _PIECE[proj]
    return rf"1 missing: expert {e}: {shard} \({param}_{'weight' if kind == 'weight' else 'bias'}\)"


def snapshot(model) -> dict:
    return {n: t.detach().view(torch.uint8).clone() for n, t in model.state_dict().items()}


def assert_intact(model, snap, x, out):
    now = snapshot(model)
    assert now.keys() == snap.keys()
    changed = [n for n in snap if not torch.equal(now[n], snap[n])]
    assert not changed, f"changed by a failed reload: {changed}"
    assert all(layer.load_state == "loaded" for layer in moe_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), out)


def cases(faults=FAULTS):
    names = list(checkpoint(0))
    return [(pos, name, fault) for pos, name in enumerate(names) for fault in faults]


def optional(name: str, fault: str) -> bool:
    """Parameters outside FusedMoE (the router) are updated when present: leaving one out is no error."""
    return fault == "missing" and name.endswith("gate.weight")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_rereadable_source_fault_changes_nothing(scheme):
    """dict (reload_weights) and list of pairs (load_checkpoint): every fault at every position raises before
    any write; the model stays bitwise the checkpoint-A model."""
    a, b = checkpoint(1), checkpoint(2)
    model = build(SCHEMES[scheme], a)
    x = torch.randn(T, H, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    snap, counts = snapshot(model), Counter()
    for seed, (pos, name, fault) in enumerate(cases()):
        bad = inject(b, pos, fault, seed)
        if optional(name, fault):
            reload_weights(model, bad)
            assert torch.equal(model.layers[0].gate.weight, a[name].to(torch.bfloat16))  # kept, not zeroed
            reload_weights(model, a)
            assert_intact(model, snap, x, out)
            counts["accepted"] += 1
            continue
        with pytest.raises((ValueError, TypeError, LoadError), match=expected_error(name, fault)) as err:
            reload_weights(model, bad)
        assert "nothing was written" in str(err.value)
        with pytest.raises((ValueError, TypeError, LoadError), match=expected_error(name, fault)):
            load_checkpoint(model, list(bad.items()), progress=False)
        assert_intact(model, snap, x, out)
        counts["error before any write"] += 1
    assert counts == {"error before any write": 20 * len(FAULTS) - 1, "accepted": 1}, counts


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_shot_stream_fault_tears_and_a_complete_reload_heals(scheme):
    a, b = checkpoint(1), checkpoint(2)
    model = build(SCHEMES[scheme], a)
    layer = model.layers[0].experts
    x = torch.randn(T, H, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    snap, counts = snapshot(model), Counter()
    for seed, (pos, name, fault) in enumerate(cases(STREAM_FAULTS)):
        bad = inject(b, pos, fault, seed)
        if optional(name, fault):
            reload_weights(model, (item for item in bad.items()))
            reload_weights(model, (item for item in a.items()))
            assert_intact(model, snap, x, out)
            counts["accepted"] += 1
            continue
        rounds = layer.load_rounds
        with pytest.raises((ValueError, TypeError, LoadError), match=expected_error(name, fault)) as err:
            reload_weights(model, (item for item in bad.items()))
        if pos == 0 and fault != "missing":  # the first tensor is bad: nothing was written
            assert "nothing was written" in str(err.value)
            assert_intact(model, snap, x, out)
            counts["error before any write"] += 1
            continue
        assert "are torn" in str(err.value) and layer.is_torn and layer.load_state == "torn"
        failed_at = "the end of the source" if fault == "missing" else "checkpoint tensor " + repr(name)
        refusal = rf"weights are torn: reload round {rounds + 1} failed: at {failed_at}".replace(".", r"\.")
        with pytest.raises(TornWeightsError, match=refusal):
            model(x)
        with pytest.raises(TornWeightsError, match=refusal):
            finalize_loading(model)
        counts["torn + refusal"] += 1
        report = reload_weights(model, (item for item in a.items()))  # a later complete reload heals
        assert report.layer_status == {"layers.0.experts": "reloaded"} and layer.load_state == "loaded"
        assert_intact(model, snap, x, out)
        counts["healed"] += 1
    before = len(STREAM_FAULTS) - 1  # position 0 (the router), every fault but "missing"
    torn = 20 * len(STREAM_FAULTS) - before - 1
    assert counts == {"error before any write": before, "torn + refusal": torn, "healed": torn, "accepted": 1}, counts


# ------------------------------------------------------------------------------------------ single cases
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
        if not fullgraph:
            # Without fullgraph, Dynamo runs the frame that raised eagerly from then on and compiles its helpers
            # one by one (torch 2.13; docs/compile.md): the layer's op() helper is one graph (its trace-state
            # marker), once. So: no new graph on the next call.
            frames = counter.frame_count
            assert torch.equal(compiled(x), out_a)
    assert counter.frame_count == frames
    torch._dynamo.reset()


@pytest.mark.parametrize("qc", [None, "fp8_channel"])
def test_nan_in_a_checkpoint_says_nothing_was_written_once(qc):
    sd = hf_checkpoint(2, E, H, I)
    sd["model.layers.1.mlp.experts.2.down_proj.weight"][3, 4] = float("nan")
    model = MoEModel(2, E, K, H, I, quant_config=qc)
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, sd, progress=False)
    msg = str(err.value)
    assert re.search(r"checkpoint tensor 'model.layers.1.mlp.experts.2.down_proj.weight': layers.1.experts: "
                     r"w2_weight expert 2 shard 'w2': non-finite values \(first at index \[3, 4\]: nan\); "
                     r"nothing was written$", msg), msg
    assert msg.count("nothing") == 1 and "nothing of this tensor" not in msg and "wrote nothing" not in msg
    assert all(m.load_state == "fresh" for m in model.modules() if isinstance(m, FusedMoE))
