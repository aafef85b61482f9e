"""Reload in place (RL weight sync, docs/design.md §10): same storage, compiled models and CUDA graphs stay valid."""
import pytest
import torch
import torch._dynamo.testing

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.quantization import Fp8Config, Int4Config, LoadError

from tests.moe_models import SCHEMES, LiveTensorBytes, MoEModel, hf_checkpoint, loaded_model, moe_layers

L, E, K, H, I = 2, 8, 2, 64, 48


def _ptrs(model):
    return {n: t.data_ptr() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def _x(T=17):
    return torch.randn(T, H, dtype=torch.bfloat16) / 2


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_reload_keeps_storage_and_matches_fresh_load(scheme):
    qc = SCHEMES[scheme]
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, quant_config=qc)
    x = _x()
    out_a = model(x)
    ptrs = _ptrs(model)
    report = reload_weights(model, b)
    assert report.layer_status == {"layers.0.experts": "reloaded", "layers.1.experts": "reloaded"}
    assert _ptrs(model) == ptrs
    fresh = loaded_model(b, quant_config=qc)
    out_b = model(x)
    torch.testing.assert_close(out_b, fresh(x), atol=0, rtol=0)
    assert not torch.equal(out_a, out_b)
    for ours, theirs in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert all(layer.staging_bytes == 0 and layer.is_loaded for layer in moe_layers(model))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_compiled_model_sees_reloaded_weights_without_recompiling(scheme):
    qc = SCHEMES[scheme]
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, quant_config=qc)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=0, rtol=0)
        frames = counter.frame_count
        reload_weights(model, b)
        torch.testing.assert_close(compiled(x), loaded_model(b, quant_config=qc)(x), atol=0, rtol=0)
    assert counter.frame_count == frames


def test_weight_loader_after_finalize_reloads_in_place():
    """Without reload_weights: a complete new set of pieces re-quantizes and closes the round by itself."""
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, quant_config=Fp8Config())
    ptrs = _ptrs(model)
    layer = model.layers[0].experts
    p = "model.layers.0.mlp.experts."
    for e in range(E):
        layer.weight_loader(layer.w13_weight, b[f"{p}{e}.gate_proj.weight"], "w1", e)
        assert layer.load_state == "reloading" and layer.is_loaded
        layer.weight_loader(layer.w13_weight, b[f"{p}{e}.up_proj.weight"], "w3", e)
        layer.weight_loader(layer.w2_weight, b[f"{p}{e}.down_proj.weight"], "w2", e)
    assert layer.load_state == "loaded"
    fresh = loaded_model(b, quant_config=Fp8Config())
    assert torch.equal(layer.w13_weight.view(torch.uint8), fresh.layers[0].experts.w13_weight.view(torch.uint8))
    assert _ptrs(model) == ptrs


def test_partial_reload():
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, quant_config=Fp8Config("channel"))
    old = model.layers[0].experts.w13_weight.clone()
    only_expert_2 = {k: v for k, v in b.items() if ".layers.0.mlp.experts.2." in k}
    with pytest.raises(LoadError, match=r"reload incomplete: 21 missing: expert 0: w1 \(w13_weight\)"):
        reload_weights(model, only_expert_2)
    # non-strict: expert 2 of layer 0 is new, everything else is kept; layer 1 received nothing and warns
    model = loaded_model(a, quant_config=Fp8Config("channel"))
    with pytest.warns(UserWarning, match=r"no weights for \['layers.1.experts'\]"):
        report = reload_weights(model, only_expert_2, strict=False)
    assert report.layer_status == {"layers.0.experts": "reloaded", "layers.1.experts": "unchanged"}
    new = model.layers[0].experts.w13_weight
    fresh = loaded_model(b, quant_config=Fp8Config("channel")).layers[0].experts.w13_weight
    assert torch.equal(new[2].view(torch.uint8), fresh[2].view(torch.uint8))
    keep = [e for e in range(E) if e != 2]
    assert torch.equal(new[keep].view(torch.uint8), old[keep].view(torch.uint8))


def test_half_staged_expert_fails_even_non_strict():
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, quant_config=Fp8Config())
    gate_only = {"model.layers.0.mlp.experts.5.gate_proj.weight": b["model.layers.0.mlp.experts.5.gate_proj.weight"]}
    with pytest.raises(LoadError, match=r"reload incomplete: 1 missing: expert 5: w3 \(w13_weight\)"):
        reload_weights(model, gate_only, strict=False)


def test_same_piece_twice_in_one_reload_round():
    model = loaded_model(hf_checkpoint(L, E, H, I, seed=1), quant_config=Fp8Config())
    layer = model.layers[1].experts
    w = torch.randn(H, I)
    layer.weight_loader(layer.w2_weight, w, "w2", 0)
    with pytest.raises(LoadError, match="loaded twice in one reload round"):
        layer.weight_loader(layer.w2_weight, w, "w2", 0)


def test_quantized_state_dict_round_trip():
    """A saved quantized state dict loads with load_state_dict, counts as loaded, and can be reloaded."""
    model = loaded_model(hf_checkpoint(L, E, H, I, seed=1), quant_config=Fp8Config("block", block_shape=(32, 32)))
    other = MoEModel(L, E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)))
    other.load_state_dict(model.state_dict())
    assert all(layer.is_loaded for layer in moe_layers(other))
    x = _x()
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
    reload_weights(other, hf_checkpoint(L, E, H, I, seed=2))


def test_reload_needs_a_finalized_model():
    model = MoEModel(L, E, K, H, I, quant_config=Fp8Config())
    with pytest.raises(LoadError, match="reload_weights needs finalized layers"):
        reload_weights(model, hf_checkpoint(L, E, H, I))


@pytest.mark.parametrize("scheme", ["fp8_tensor", "int8_w8a16"])
def test_reload_memory_within_streaming_bound(scheme):
    """Live bytes during a reload: at most two experts' full-precision weights above the loaded model."""
    L_, E_, H_, I_ = 3, 8, 256, 128
    a, b = hf_checkpoint(L_, E_, H_, I_, seed=1), hf_checkpoint(L_, E_, H_, I_, seed=2)
    with LiveTensorBytes() as mem:
        model = MoEModel(L_, E_, K, H_, I_, quant_config=SCHEMES[scheme])
        load_checkpoint(model, a, progress=False)
        finalize_loading(model)
        before = mem.settle()
        mem.peak = before
        reload_weights(model, b)
        after = mem.settle()
    assert after == before
    assert mem.peak - before <= 2 * moe_layers(model)[0].expert_nbytes


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["none", "fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16"])
def test_cuda_graph_replay_after_reload(scheme):
    """Capture on checkpoint A, reload B, replay: equals a fresh load of B; no data_ptr moved."""
    qc = {"fp8_block": Fp8Config("block"), "int4_w4a16": Int4Config(128)}.get(scheme, SCHEMES.get(scheme))
    H_, I_ = 256, 128
    a, b = hf_checkpoint(L, E, H_, I_, seed=1), hf_checkpoint(L, E, H_, I_, seed=2)
    model = loaded_model(a, H=H_, I=I_, quant_config=qc, device="cuda")
    x = torch.randn(33, H_, dtype=torch.bfloat16, device="cuda") / 2
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(x)  # warm up (Triton compiles outside the capture)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        graph.replay()
        out_a = out.clone()
        ptrs = _ptrs(model)
        reload_weights(model, b)
        assert _ptrs(model) == ptrs
        graph.replay()
        fresh = loaded_model(b, H=H_, I=I_, quant_config=qc, device="cuda")
        torch.testing.assert_close(out, fresh(x), atol=0, rtol=0)
    assert not torch.equal(out, out_a)
