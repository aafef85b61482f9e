"""Pre-quantized fp8 pieces through ``weight_loader`` (``layer/loading/prequantized.py``, docs/design.md §11,
docs/online-quantization.md "Pre-quantized fp8 checkpoints"): e4m3 weights are written as they are, their
scales (``real = q * scale``) into the layer's scale layout, both tracked as pieces of the load (whole
checkpoints through ``load_checkpoint``: tests/checkpoint/test_formats.py)."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, Int8Config, LoadError
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.layer.loading import ExpertLayout, LoadTargets, WeightLoader
from torch_moe_ops.layer.loading.checks import first_nonfinite
from torch_moe_ops.schemes import get_activation

from tests.fp8_checkpoints import BLOCK, CONFIGS, E, H, I, K, checkpoint, quantize, weights
from tests.moe_models import MoEModel

FP8 = torch.float8_e4m3fn


def online(qc, ws, **kw):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32, **kw)
    w1, w3, w2 = ws
    layer.load_weights(torch.cat([w1, w3], 1) if w3 is not None else w1, w2)
    return layer


def load_pieces(layer, ws, qc, form):
    """Pre-quantized pieces through weight_loader: ``shards`` (w1, w3, w2 per expert), ``fused`` (gate_up per
    expert) or ``all`` (expert_id=None)."""
    w1, w3, w2 = ws
    sharded = qc.quant_scheme.weight.sharded
    if form == "all":  # per-tensor: w13 [E, 2] (gate, up apart), w2 [E, 1]
        for param, w, shard in (("w13", torch.cat([w1, w3], 1), None), ("w2", w2, "w2")):
            q, s = moe.quantize_weight(w, qc.weight_scheme, block_shape=qc.kernel_block_shape,
                                       shards=2 if sharded and shard is None else 1)
            layer.weight_loader(getattr(layer, param + "_weight"), q, shard, None)
            layer.weight_loader(getattr(layer, param + "_weight_scale"), s, shard, None)
        return
    for e in range(E):
        pieces = [("w13", torch.cat([w1[e], w3[e]]), None)] if form == "fused" else [("w13", w1[e], "w1"),
                                                                                       ("w13", w3[e], "w3")]
        for param, w, shard in pieces + [("w2", w2[e], "w2")]:
            if shard is None and sharded:
                q, s = moe.quantize_weight(w[None], qc.weight_scheme, shards=2)  # gate and up scales apart: [1, 2]
                q, s = q[0], s[0]
            else:
                q, s = quantize(w, qc)
            layer.weight_loader(getattr(layer, param + "_weight"), q, shard, e)
            layer.weight_loader(getattr(layer, param + "_weight_scale"), s, shard, e)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_same_layer(a: FusedMoE, b: FusedMoE):
    for n in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        assert same_bytes(getattr(a, n), getattr(b, n)), n
    x, logits = torch.randn(33, H), torch.randn(33, E)
    assert torch.equal(a(x, logits), b(x, logits))


# ------------------------------------------------------------------------------------------ weight_loader
@pytest.mark.parametrize("form", ["shards", "fused", "all"])
@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_prequantized_pieces_equal_online_quantization(scheme, form):
    """Per projection, the package's quantizer gives the same q and scales as online quantization of w13 (I is
    a multiple of the 32-row tile; per-tensor keeps gate and up apart), so the layers are bitwise equal."""
    qc, ws = CONFIGS[scheme], weights()
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_pieces(layer, ws, qc, form)
    assert layer.staging_bytes == 0 and layer.missing_weights() == []
    assert layer.finalize_loading() == "loaded"
    assert_same_layer(layer, online(qc, ws))


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_fp8_rows_and_scales_are_written_as_given(scheme):
    """Arbitrary e4m3 bytes (not what the quantizer would produce) and arbitrary scales land bitwise: nothing
    is re-quantized. bf16 scales are widened to fp32 exactly."""
    qc = CONFIGS[scheme]
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    q = {s: (torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) & 0xF7).view(FP8)  # no NaN bytes
         for s, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I)))}
    s_shape = {"w1": quantize(torch.ones(I, H), qc)[1].shape, "w3": quantize(torch.ones(I, H), qc)[1].shape,
               "w2": quantize(torch.ones(H, I), qc)[1].shape}
    scale = {s: (torch.rand(shape, generator=g) + 0.5).to(torch.bfloat16) for s, shape in s_shape.items()}
    for e in range(E):
        for s in ("w1", "w3", "w2"):
            p = "w2" if s == "w2" else "w13"
            layer.weight_loader(getattr(layer, p + "_weight"), q[s], s, e)
            layer.weight_loader(getattr(layer, p + "_weight_scale"), scale[s], s, e)
    layer.finalize_loading()
    assert same_bytes(layer.w13_weight[2, :I], q["w1"]) and same_bytes(layer.w13_weight[4, I:], q["w3"])
    assert same_bytes(layer.w2_weight[3], q["w2"])
    s13 = torch.cat([scale["w1"].float().reshape(-1), scale["w3"].float().reshape(-1)])
    assert torch.equal(layer.w13_weight_scale[1].reshape(-1), s13)
    assert torch.equal(layer.w2_weight_scale[0].reshape(-1), scale["w2"].float().reshape(-1))


def test_a_projection_needs_its_weight_and_its_scale():
    qc, (w1, w3, w2) = BLOCK, weights()
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    for e in range(E):
        for w, s in ((w1[e], "w1"), (w3[e], "w3"), (w2[e], "w2")):
            q, sc = quantize(w, qc)
            p = "w2" if s == "w2" else "w13"
            layer.weight_loader(getattr(layer, p + "_weight"), q, s, e)
            if (e, s) != (2, "w3"):
                layer.weight_loader(getattr(layer, p + "_weight_scale"), sc, s, e)
    assert layer.missing_weights() == [("w13_weight_scale", 2, "w3")]
    with pytest.raises(LoadError, match=r"1 missing: expert 2: w3 \(w13_weight_scale\)"):
        layer.finalize_loading()
    with pytest.raises(LoadError, match="not loaded"):
        layer(torch.randn(3, H), torch.randn(3, E))
    layer.weight_loader(layer.w13_weight_scale, quantize(w3[2], qc)[1], "w3", 2)
    assert layer.finalize_loading() == "loaded"
    # a scale without its weight is missing the weight, and a second scale is a piece loaded twice
    other = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    other.weight_loader(other.w2_weight_scale, quantize(w2[0], qc)[1], "w2", 0)
    assert ("w2_weight", 0, "w2") in other.missing_weights()
    with pytest.raises(LoadError, match="w2_weight_scale expert 0 shard 'w2' was loaded twice"):
        other.weight_loader(other.w2_weight_scale, quantize(w2[0], qc)[1], "w2", 0)


@pytest.mark.parametrize("order", ["float_first", "fp8_first", "float_with_a_scale"])
def test_a_round_mixing_float_and_fp8_weights_of_an_expert_is_refused(order):
    qc, (w1, w3, _) = Fp8Config("channel"), weights()
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    q3, s3 = quantize(w3[1], qc)
    if order == "float_first":
        layer.weight_loader(layer.w13_weight, w1[1], "w1", 1)
        calls = [(layer.w13_weight, q3, "w3")]
    elif order == "fp8_first":
        layer.weight_loader(layer.w13_weight, q3, "w3", 1)
        layer.weight_loader(layer.w13_weight_scale, s3, "w3", 1)
        calls = [(layer.w13_weight, w1[1], "w1")]
    else:
        layer.weight_loader(layer.w13_weight, w1[1], "w1", 1)
        calls = [(layer.w13_weight_scale, quantize(w1[1], qc)[1], "w1")]
    before = (layer.missing_weights(), layer.staging_bytes)
    for param, t, shard in calls:
        with pytest.raises(LoadError, match=r"FusedMoE\(E=5.*: expert 1 mixes formats in one round: .* is "
                                            r"pre-quantized fp8 but the w1 weight is full precision"):
            layer.weight_loader(param, t, shard, 1)
    assert (layer.missing_weights(), layer.staging_bytes) == before  # the refused call recorded nothing
    layer.weight_loader(layer.w13_weight, w1[2], "w1", 2)  # another expert may come in another format


def test_block_gate_up_pieces_that_straddle_tiles_are_refused_but_fused_works():
    """I = 48 with 32-row tiles: tile 1 of w13 holds gate rows 32..47 and up rows 0..15."""
    I_ = 48
    layer = FusedMoE(E, K, H, I_, quant_config=BLOCK, params_dtype=torch.float32)
    layer.layer_name = "model.layers.4.mlp.experts"
    q, s = quantize(torch.randn(I_, H), BLOCK)
    for param, t in ((layer.w13_weight, q), (layer.w13_weight_scale, s)):
        with pytest.raises(ValueError, match=r"model.layers.4.mlp.experts: w13_weight(_scale)? expert 3 shard 'w3'"
                                             r".*I=48 is not a multiple of the block's 32 rows"):
            layer.weight_loader(param, t, "w3", 3)
    assert layer.load_state == "fresh"
    w1, w3, w2 = weights(I=I_)
    fused = FusedMoE(E, K, H, I_, quant_config=BLOCK, params_dtype=torch.float32)
    for e in range(E):  # the fused gate_up has the layer's own tile grid
        for p, w, shard in (("w13", torch.cat([w1[e], w3[e]]), None), ("w2", w2[e], "w2")):
            q, s = quantize(w, BLOCK)
            fused.weight_loader(getattr(fused, p + "_weight"), q, shard, e)
            fused.weight_loader(getattr(fused, p + "_weight_scale"), s, shard, e)
    fused.finalize_loading()
    ref = FusedMoE(E, K, H, I_, quant_config=BLOCK, params_dtype=torch.float32)
    ref.load_weights(torch.cat([w1, w3], 1), w2)
    assert_same_layer(fused, ref)


def test_interleaved_per_tensor_gate_and_up_share_one_scale():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("tensor"), activation="swigluoai")
    q, s = quantize(torch.randn(I, H), Fp8Config("tensor"))
    with pytest.raises(ValueError, match=r"expert 0 shard 'w1': gate and up rows are interleaved \(swigluoai\), "
                                         "so each per-tensor scale covers both"):
        layer.weight_loader(layer.w13_weight, q, "w1", 0)
    layer.weight_loader(layer.w13_weight_scale, torch.tensor(0.5), None, 0)  # fused: one value for both
    assert layer.w13_weight_scale[0].tolist() == [0.5]


# ------------------------------------------------------------------------------------------ mismatches
@pytest.mark.parametrize("qc", [None, Int8Config(), Int4Config(32)], ids=["none", "int8", "int4"])
def test_fp8_pieces_into_a_layer_without_fp8_weights(qc):
    layer = FusedMoE(E, K, 64, I, quant_config=qc)  # H = 64: int4 groups of 32 divide it
    layer.layer_name = "model.layers.0.mlp.experts"
    config = "None" if qc is None else type(qc).__name__
    with pytest.raises(TypeError, match=rf"model.layers.0.mlp.experts: w2_weight expert 1 shard 'w2': a pre-quantized "
                                        rf"float8_e4m3fn weight .* quant_config is {config}"):
        layer.weight_loader(layer.w2_weight, torch.randn(64, I).to(FP8), "w2", 1)
    with pytest.raises(TypeError, match=rf"w13_weight_scale.*a weight scale .*quant_config is {config}"):
        layer.weight_loader("w13_weight_scale", torch.ones(I), "w1", 1)
    assert layer.load_state == "fresh"


def test_scale_dtype_value_and_format_errors():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    ok = torch.rand(H) + 0.1
    with pytest.raises(TypeError, match=r"float8_e5m2 weights are not read; pre-quantized checkpoints must be "
                                        "float8_e4m3fn"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I).to(torch.float8_e5m2), "w2", 0)
    for bad_dtype in (torch.float16, torch.int32):
        with pytest.raises(TypeError, match=rf"weight scales must be fp32 or bf16, got {bad_dtype}"):
            layer.weight_loader(layer.w2_weight_scale, ok.to(bad_dtype), "w2", 0)
    for value, what in ((float("nan"), "non-finite"), (float("inf"), "non-finite"), (-0.5, "negative weight scale")):
        bad = ok.clone()
        bad[37] = value
        with pytest.raises(ValueError, match=rf"w2_weight_scale expert 0 shard 'w2': {what}.*index \[37\]"):
            layer.weight_loader(layer.w2_weight_scale, bad, "w2", 0)
    nan_q = torch.randn(H, I).to(FP8)
    for byte in (0x7F, 0xFF):  # +NaN and -NaN of e4m3fn
        nan_q.view(torch.uint8)[5, 6] = byte
        assert first_nonfinite(nan_q)[0] == [5, 6]
        with pytest.raises(ValueError, match=r"w2_weight expert 0 shard 'w2': non-finite values .*index \[5, 6\]"):
            layer.weight_loader(layer.w2_weight, nan_q, "w2", 0)
    block_scale = quantize(torch.randn(H, I), Fp8Config("block"))[1]  # [1, 1] grid: not a channel scale
    with pytest.raises(ValueError, match=r"scale shape \[1, 1\] is not a scale of this layer's "
                                         r"Fp8Config\(scheme='channel'.*expects \[100\] or \[100, 1\]"):
        layer.weight_loader(layer.w2_weight_scale, block_scale, "w2", 0)
    with pytest.raises(ValueError, match=r"pre-quantized pieces must be \[out, in\]"):
        layer.weight_loader(layer.w2_weight, torch.randn(H, I).to(FP8), "w2", 0, transposed=True)
    with pytest.raises(ValueError, match=r"expected shape \[100, 64\], got \[64, 100\]"):  # never guessed
        layer.weight_loader(layer.w2_weight, torch.randn(I, H).to(FP8), "w2", 0)
    assert layer.load_state == "fresh"
    layer.weight_loader(layer.w2_weight_scale, ok[:, None].to(torch.bfloat16), "w2", 0)  # [N, 1] bf16 is fine


def test_a_checkpoint_block_size_other_than_the_layers_names_both():
    layer = FusedMoE(E, K, 160, 128, quant_config=Fp8Config("block", block_shape=(32, 32)))
    s = quantize(torch.randn(128, 160), Fp8Config("block", block_shape=(64, 64)))[1]  # grid [2, 3]
    with pytest.raises(ValueError, match=r"scale shape \[2, 3\] is not a scale of this layer's Fp8Config\(scheme="
                                         r"'block', block_shape=\(32, 32\)\) for a \[128, 160\] weight \(expects "
                                         r"\[4, 5\]\); it is the grid of block \[64, 64\].*block_shape=\(64, 64\)"):
        layer.weight_loader(layer.w13_weight_scale, s, "w1", 0)


# ------------------------------------------------------------------------------------------ reload
@pytest.mark.parametrize("scheme", ["block", "tensor"])
def test_reload_in_place_holds_each_projection_until_weight_and_scale_arrived(scheme):
    qc = CONFIGS[scheme]
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_pieces(layer, weights(0), qc, "shards")
    layer.finalize_loading()
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    old = {n: p.detach().clone() for n, p in layer.named_parameters()}
    w1, w3, w2 = weights(1)
    q2, s2 = quantize(w2[3], qc)
    layer.weight_loader(layer.w2_weight, q2, "w2", 3)  # a reload round starts; forward still runs
    assert layer.load_state == "reloading" and layer.staging_bytes == q2.numel()
    assert same_bytes(layer.w2_weight, old["w2_weight"])  # held: never a new weight with the old scale
    layer.weight_loader(layer.w2_weight_scale, s2, "w2", 3)
    assert same_bytes(layer.w2_weight[3], q2) and layer.staging_bytes == 0
    for e in range(E):
        for w, s in ((w1[e], "w1"), (w3[e], "w3"), (w2[e], "w2")):
            if (e, s) == (3, "w2"):
                continue
            p, (q, sc) = ("w2" if s == "w2" else "w13"), quantize(w, qc)
            layer.weight_loader(getattr(layer, p + "_weight_scale"), sc, s, e)  # scale first works too
            layer.weight_loader(getattr(layer, p + "_weight"), q, s, e)
    assert layer.load_state == "loaded" and layer.load_rounds == 2  # a complete set ends the round
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs
    assert_same_layer(layer, online(qc, (w1, w3, w2)))


def test_reload_from_float_after_a_prequantized_load_and_a_half_projection_tears():
    qc = BLOCK
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_pieces(layer, weights(0), qc, "fused")
    layer.finalize_loading()
    w1, w3, w2 = weights(2)
    layer.load_weights(torch.cat([w1, w3], 1), w2)  # an RL sync from a bf16 trainer: quantized online
    assert_same_layer(layer, online(qc, (w1, w3, w2)))
    snap = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer.weight_loader(layer.w13_weight, quantize(w1[0], qc)[0], "w1", 0)  # no scale follows
    with pytest.raises(moe.TornWeightsError, match=r"reload incomplete: 3 missing: expert 0: w3 \(w13_weight\), "
                                                   r"w1 \(w13_weight_scale\), w3 \(w13_weight_scale\)"):
        layer.finalize_loading(strict_reload=False)
    assert all(same_bytes(p, snap[n]) for n, p in layer.named_parameters())  # the held piece never landed


def test_reload_weights_from_a_source_missing_a_scale_changes_nothing():
    qc, ws = Fp8Config("channel"), weights(0)
    model = MoEModel(1, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_checkpoint(model, checkpoint(ws, qc), progress=False)
    finalize_loading(model)
    snap = {n: t.detach().clone() for n, t in model.state_dict().items()}
    bad = checkpoint(weights(1), qc)
    del bad["model.layers.0.mlp.experts.4.down_proj.weight_scale"]
    with pytest.raises(LoadError, match=r"(?s)nothing was written.*expert 4: w2 \(w2_weight_scale\)"):
        reload_weights(model, bad)
    assert all(same_bytes(t, snap[n]) for n, t in model.state_dict().items())
    mixed = checkpoint(weights(1), qc)
    mixed["model.layers.0.mlp.experts.1.up_proj.weight"] = weights(1)[1][1]  # float up, fp8 gate and down
    with pytest.raises(LoadError, match=r"(?s)expert 1 mixes formats .*checkpoint tensor 'model.layers.0.mlp.experts.1"
                                        r".*is pre-quantized fp8 but checkpoint tensor 'model.layers.0.mlp.experts.1"
                                        r".up_proj.weight' is full precision"):
        reload_weights(model, mixed)
    assert all(same_bytes(t, snap[n]) for n, t in model.state_dict().items())
    fresh = MoEModel(1, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    with pytest.raises(LoadError, match=r"(?s)nothing was written.*expert 1 mixes formats"):  # a first load too
        load_checkpoint(fresh, mixed, progress=False)
    assert fresh.layers[0].experts.load_state == "fresh"


# ------------------------------------------------------------------------------------------ tensor parallel
@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_tensor_parallel_ranks_take_their_slice_of_weights_and_scales(scheme):
    """Through the loader alone (no process group): each of 2 TP ranks holds the rows / columns (and scale rows /
    columns) of the full layer's I slice."""
    qc, If, Hp = CONFIGS[scheme], 128, 96
    w1, w3, w2 = weights(4, H=Hp, I=If)

    def loader(rank, tp):
        lay = ExpertLayout(E, E, Hp, If, If // tp, get_activation("silu"), torch.float32, tp_rank=rank, tp_size=tp)
        Il = If // tp
        sharded = qc.quant_scheme.weight.sharded
        params = {"w13_weight": torch.empty(E, 2 * Il, Hp, dtype=FP8), "w2_weight": torch.empty(E, Hp, Il, dtype=FP8),
                  "w13_weight_scale": torch.zeros(qc.scale_shape(E, 2 * Il, Hp, lay.w13_shards)),
                  "w2_weight_scale": torch.zeros(qc.scale_shape(E, Hp, Il, 0 if sharded else 1)),
                  "w13_bias": None, "w2_bias": None, "e_score_correction_bias": None}
        wl, targets = WeightLoader(lay, qc, lambda: f"rank {rank}"), LoadTargets(params, {}, lambda e: [e])
        for e in range(E):
            for p, w, s in (("w13", w1[e], "w1"), ("w13", w3[e], "w3"), ("w2", w2[e], "w2")):
                q, sc = quantize(w, qc)
                wl.load(targets, p + "_weight", q, s, e)
                wl.load(targets, p + "_weight_scale", sc, s, e)
        assert wl.finalize() == "loaded"
        return params

    full = loader(0, 1)
    for rank in (0, 1):
        part, lo, hi = loader(rank, 2), rank * If // 2, (rank + 1) * If // 2
        rows = list(range(lo, hi)) + list(range(If + lo, If + hi))
        assert same_bytes(part["w13_weight"], full["w13_weight"][:, rows])
        assert same_bytes(part["w2_weight"], full["w2_weight"][:, :, lo:hi])
        s13, s2 = full["w13_weight_scale"], full["w2_weight_scale"]
        if scheme == "channel":
            s13 = s13[:, rows]
        elif scheme == "block":
            s13, s2 = s13[:, [r // 32 for r in rows[::32]]], s2[:, :, lo // 32 : hi // 32]
        assert torch.equal(part["w13_weight_scale"], s13) and torch.equal(part["w2_weight_scale"], s2)
