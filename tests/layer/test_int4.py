"""FusedMoE with Int4Config (int4_w4a16, docs/design.md §3, §10): packed storage, group-boundary errors,
streaming load, peak staging, reload in place, compile, and accuracy against the full-precision layer.

int4 needs every GEMM K (H for w13, I for w2) divisible by the group G, so these tests use their own
shapes (the shared ones, H = 64 and I = 48, do not divide by 32)."""
import math

import pytest
import torch
import torch._dynamo.testing
import torch.fx.experimental._config as fx_config
from torch._dynamo.utils import counters

import torch_moe_ops
from torch_moe_ops import Fp8Config, Int4Config, ParallelConfig, quantize_weight
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.schemes import get_weight_format
from torch_moe_ops.testing import random_moe_weights, sqnr_db

from tests.moe_models import LiveTensorBytes, MoEModel, expert_tensors, hf_checkpoint, loaded_model, moe_layers

E, K = 8, 2
GROUPS = (32, 64, 128)
MiB = 2**20


def _shape(G):
    """(H, I) for a group size: the smallest test shape both of whose K dims divide by G."""
    return (64, 64) if G < 128 else (128, 128)


def _inputs(H, T=33):
    return torch.randn(T, H, dtype=torch.bfloat16) / 2, torch.randn(T, E)


# ---------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("activation", ["silu", "relu2_no_mul"])
def test_packed_parameters(G, activation):
    H, I = _shape(G)
    qc = Int4Config(group_size=G)
    layer = FusedMoE(E, K, H, I, quant_config=qc, activation=activation, has_bias=True)
    N1 = 2 * I if layer.gated else I
    p = dict(layer.named_parameters())
    assert p["w13_weight"].dtype == p["w2_weight"].dtype == torch.uint8
    assert p["w13_weight"].shape == qc.storage_shape(E, N1, H) == (E, N1, H // 2)
    assert p["w2_weight"].shape == qc.storage_shape(E, H, I) == (E, H, I // 2)
    assert p["w13_weight_scale"].shape == (E, N1, H // G) and p["w2_weight_scale"].shape == (E, H, I // G)
    assert p["w13_weight_scale"].dtype == torch.float32
    assert p["w13_bias"].shape == (E, N1) and p["w13_bias"].dtype == torch.bfloat16
    # the checkpoint-format weights are meta descriptors with the logical (unpacked) shapes
    fp = layer.full_precision
    assert fp["w13_weight"].is_meta and fp["w13_weight"].shape == (E, N1, H) and fp["w2_weight"].shape == (E, H, I)
    assert layer.quant_scheme == "int4_w4a16" and layer.block_shape == [1, G]
    assert layer.expert_nbytes == (N1 + I) * H * 2  # staging is full precision, not packed
    assert f"block_shape=[1, {G}]" in repr(layer)


def test_dims_not_divisible_by_group_fail_at_construction():
    with pytest.raises(ValueError, match=r"FusedMoE\(E=8, H=96, I=128\): .*hidden_size.*96.*group size 64"):
        FusedMoE(E, K, 96, 128, quant_config=Int4Config(group_size=64))
    with pytest.raises(ValueError, match=r"FusedMoE\(E=8, H=64, I=48\): .*intermediate_size.*48.*group size 32"):
        FusedMoE(E, K, 64, 48, quant_config=Int4Config(group_size=32))
    with pytest.raises(ValueError, match="G in"):
        Int4Config(group_size=48)
    FusedMoE(E, K, 64, 96, quant_config=Int4Config(group_size=32))  # 96 = 3 groups: fine


def test_tp_shard_must_fall_on_group_boundaries():
    """Checked from the config alone, before the process group is asked (so no group is needed here)."""
    with pytest.raises(ValueError, match=r"I/tp = 48 to be a multiple of its scale tile \(1, 32\)"):
        FusedMoE(E, K, 64, 96, quant_config=Int4Config(32), parallel=ParallelConfig(tp_size=2, tp_rank=1))
    # the fp8_block rule is the same call on the config
    with pytest.raises(ValueError, match=r"fp8_block needs the TP shard I/tp = 48"):
        FusedMoE(E, K, 64, 96, quant_config=Fp8Config("block", block_shape=(32, 32)),
                 parallel=ParallelConfig(tp_size=2, tp_rank=0))
    # EP keeps the full I per expert: the full I must divide by G
    with pytest.raises(ValueError, match=r"intermediate_size.*48.*group size 32"):
        FusedMoE(E, K, 64, 48, quant_config=Int4Config(32), parallel=ParallelConfig(ep_size=2, ep_rank=0))
    # a shard on a boundary passes every shape check and only then needs the process group
    with pytest.raises(RuntimeError, match="init_process_group"):
        FusedMoE(E, K, 64, 128, quant_config=Int4Config(64), parallel=ParallelConfig(tp_size=2, tp_rank=0))


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("G", GROUPS)
def test_slots_equal_quantize_weight_and_forward_matches_op(G):
    H, I = _shape(G)
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True)
    layer = FusedMoE(E, K, H, I, quant_config=Int4Config(G), has_bias=True)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)
    q13, s13 = quantize_weight(w13, "int4_group", block_shape=[1, G])
    q2, s2 = quantize_weight(w2, "int4_group", block_shape=[1, G])
    assert torch.equal(layer.w13_weight, q13) and torch.equal(layer.w2_weight, q2)
    assert torch.equal(layer.w13_weight_scale, s13) and torch.equal(layer.w2_weight_scale, s2)
    x, logits = _inputs(H)
    out = layer(x, logits)
    expected = torch_moe_ops.fused_moe(x, logits, q13, q2, K, quant_scheme="int4_w4a16", w13_scale=s13, w2_scale=s2,
                                       w13_bias=b13, w2_bias=b2, block_shape=[1, G])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(layer.forward_experts(x, *layer.select_experts(logits)), out, atol=0, rtol=0)


def test_each_expert_quantized_as_soon_as_complete():
    G, (H, I) = 32, _shape(32)
    w1, w3, w2 = expert_tensors(E, H, I)
    layer = FusedMoE(E, K, H, I, quant_config=Int4Config(G))
    for e in range(E):
        layer.weight_loader(layer.w13_weight, w1[e], "w1", e)
        assert layer.staging_bytes == 2 * I * H * 2  # the expert's bf16 [2I, H] staging, not its packed size
        layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
        layer.weight_loader(layer.w13_weight, w3[e], "w3", e)
        assert layer.staging_bytes == 0
        q, s = quantize_weight(torch.cat([w1[e], w3[e]]).to(torch.bfloat16), "int4_group", block_shape=[1, G])
        assert torch.equal(layer.w13_weight[e], q) and torch.equal(layer.w13_weight_scale[e], s)
    assert layer.peak_staging_bytes == layer.expert_nbytes  # w13 staging + the fp32 w2's bf16 copy
    layer.finalize_loading()
    assert layer.is_loaded


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32])
def test_peak_memory_cpu(ckpt_dtype):
    """The fp8 bound (loading/test_streamer.py) for int4: peak <= final + 2 experts + 64 MiB, and tighter, one
    expert's w13 staging plus (fp32 checkpoint) its w2 conversion."""
    L, H, I = 4, 256, 128
    sd = hf_checkpoint(L, E, H, I, dtype=ckpt_dtype)
    with LiveTensorBytes() as mem:
        model = MoEModel(L, E, K, H, I, quant_config=Int4Config(64))
        load_checkpoint(model, sd, progress=False)
        finalize_loading(model)
        final = mem.settle()
    expert = moe_layers(model)[0].expert_nbytes
    assert final == sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem.peak <= final + 2 * expert + 64 * MiB
    w2_conversion = H * I * 2 if ckpt_dtype != torch.bfloat16 else 0
    assert mem.peak - final <= 2 * I * H * 2 + w2_conversion, (mem.peak, final, expert)


def test_reload_in_place_keeps_data_ptrs_and_memory_bound():
    L, H, I = 2, 128, 128
    qc = Int4Config(128)
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, num_layers=L, H=H, I=I, quant_config=qc)
    x = torch.randn(17, H, dtype=torch.bfloat16) / 2
    out_a = model(x)
    ptrs = {n: t.data_ptr() for n, t in model.named_parameters()}
    with LiveTensorBytes() as mem:  # counts only what the reload allocates
        report = reload_weights(model, b)
        assert mem.settle() == 0
    assert 0 < mem.peak <= 2 * moe_layers(model)[0].expert_nbytes
    assert report.layer_status == {"layers.0.experts": "reloaded", "layers.1.experts": "reloaded"}
    assert ptrs == {n: t.data_ptr() for n, t in model.named_parameters()}
    fresh = loaded_model(b, num_layers=L, H=H, I=I, quant_config=qc)
    for ours, theirs in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(ours, theirs)
    out_b = model(x)
    torch.testing.assert_close(out_b, fresh(x), atol=0, rtol=0)
    assert not torch.equal(out_a, out_b)


def test_compiles_once_and_sees_reloaded_weights():
    L, H, I, G = 2, 64, 64, 32
    a, b = hf_checkpoint(L, E, H, I, seed=1), hf_checkpoint(L, E, H, I, seed=2)
    model = loaded_model(a, num_layers=L, H=H, I=I, quant_config=Int4Config(G))
    torch._dynamo.reset()
    counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True), \
                torch._dynamo.config.patch(error_on_recompile=True):
            for T in (1, 2, 17, 33):
                x = torch.randn(T, H, dtype=torch.bfloat16) / 2
                torch.testing.assert_close(compiled(x), model(x), atol=0, rtol=0)
            frames = counter.frame_count
            reload_weights(model, b)
            fresh = loaded_model(b, num_layers=L, H=H, I=I, quant_config=Int4Config(G))
            torch.testing.assert_close(compiled(x), fresh(x), atol=0, rtol=0)
        assert counters["stats"]["unique_graphs"] == 1 and counter.frame_count == frames
        ops = [n.target for n in counter.graphs[-1].graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.moe.fused_moe) == L
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("G", GROUPS)
def test_accuracy_against_full_precision(G):
    """SQNR of the int4 layer's output vs the same bf16 layer, with a floor derived from the weights.

    Measured (gaussian weights, E = 8, T = 33, three seeds): weight SQNR 20.3 / 19.4 / 18.6 dB for
    G = 32 / 64 / 128 (a larger group has a larger amax, so a coarser step), output SQNR 14.8-15.7 /
    14.0-14.7 / 13.5-13.8 dB. The output sees three independently quantized matrices (gate, up, down),
    whose relative noise powers add: about 3x the weights' noise, i.e. weight SQNR - 10 log10(3) =
    weight SQNR - 4.8 dB, which matches the measurements to +-0.6 dB. Floors: the weights within 0.5 dB of
    the measured value, the output within 2 dB of the three-matrix estimate. Real defects cost far more:
    swapping the two nibbles of every byte gives -3 dB on the weights, scales off by 2x give 6 dB or less."""
    H, I = _shape(G)
    w13, w2, _, _ = random_moe_weights(E, H, I)
    x, logits = _inputs(H)
    ref = FusedMoE(E, K, H, I)
    ref.load_weights(w13, w2)
    layer = FusedMoE(E, K, H, I, quant_config=Int4Config(G))
    layer.load_weights(w13, w2)
    fmt, block = get_weight_format("int4_group"), (1, G)
    weight_db = min(sqnr_db(w.float(), fmt.dequantize(q, s, block))
                    for w, q, s in ((w13, layer.w13_weight, layer.w13_weight_scale),
                                    (w2, layer.w2_weight, layer.w2_weight_scale)))
    measured = {32: 20.3, 64: 19.4, 128: 18.6}[G]
    assert weight_db > measured - 0.5, weight_db
    out_db = sqnr_db(ref(x, logits).float(), layer(x, logits).float())
    assert out_db > weight_db - 10 * math.log10(3) - 2.0, (out_db, weight_db)
