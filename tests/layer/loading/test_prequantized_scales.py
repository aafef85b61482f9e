"""Pre-quantized fp8 pieces whose scale grids are not whole tiles (``layer/loading/prequantized.py``,
docs/design.md §11): ceil-division block grids with the scale before or after its weight, a scale loaded twice,
per-tensor scale shapes, bad scale values refused before anything is recorded, and a one-shot pre-quantized
stream that dies midway (torn, then healed in place by a complete reload)."""
import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import Fp8Config, FusedMoE, LoadError, TornWeightsError
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights

from tests.moe_models import MoEModel

E, K, H, I = 5, 2, 100, 48  # H and I not multiples of the 32-wide blocks: ceil-division scale grids
BLOCK = Fp8Config("block", block_shape=(32, 32))
NAME = "model.layers.0.mlp.experts"


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, *s, generator=g) / 10 for s in ((I, H), (I, H), (H, I))]  # w1, w3, w2


def _q(w, qc):
    return moe.quantize_weight(w, qc.weight_scheme, block_shape=qc.kernel_block_shape)


def _layer(qc=BLOCK):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    layer.layer_name = NAME
    return layer


def _load_fused(layer, ws, qc, scale_first=False):
    """Per expert: a fused gate_up (its own tile grid, I % 32 != 0 is fine) and a down, fp8 with scales."""
    w1, w3, w2 = ws
    for e in range(E):
        for param, w, shard in (("w13", torch.cat([w1[e], w3[e]]), None), ("w2", w2[e], "w2")):
            q, s = _q(w, qc)
            calls = [(getattr(layer, param + "_weight"), q), (getattr(layer, param + "_weight_scale"), s)]
            for p, t in calls[::-1] if scale_first else calls:
                layer.weight_loader(p, t, shard, e)


def _online(ws, qc=BLOCK):
    layer = _layer(qc)
    w1, w3, w2 = ws
    layer.load_weights(torch.cat([w1, w3], 1), w2)
    return layer


def test_block_scales_with_ceil_division_grids_scale_first_or_last():
    assert _layer().w13_weight_scale.shape == (E, 3, 4) and _layer().w2_weight_scale.shape == (E, 4, 2)
    ws = _weights()
    ref = _online(ws)
    for scale_first in (False, True):
        layer = _layer()
        _load_fused(layer, ws, BLOCK, scale_first)
        assert layer.finalize_loading() == "loaded"
        for n in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
            assert torch.equal(getattr(layer, n).view(torch.uint8) if "scale" not in n else getattr(layer, n),
                               getattr(ref, n).view(torch.uint8) if "scale" not in n else getattr(ref, n)), n
    layer = _layer()
    q, s = _q(ws[2][0], BLOCK)
    with pytest.raises(ValueError, match=r"scale shape \[3, 2\] is not a scale .* for a \[100, 48\] weight "
                                         r"\(expects \[4, 2\]\)"):  # a floor-division grid
        layer.weight_loader(layer.w2_weight_scale, s[:3], "w2", 0)
    layer.weight_loader(layer.w2_weight_scale, s, "w2", 0)
    with pytest.raises(LoadError, match=rf"{NAME}: w2_weight_scale expert 0 shard 'w2' was loaded twice"):
        layer.weight_loader(layer.w2_weight_scale, s, "w2", 0)
    missing = layer.missing_weights()
    assert missing[:1] == [("w13_weight", 0, "w1")] and ("w2_weight", 0, "w2") in missing


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_per_tensor_scale_shapes(shape):
    qc = Fp8Config("tensor")
    layer = _layer(qc)
    q, s = _q(_weights()[2][1], qc)
    layer.weight_loader(layer.w2_weight, q, "w2", 1)
    layer.weight_loader(layer.w2_weight_scale, s.reshape(shape), "w2", 1)
    assert layer.w2_weight_scale[1] == s.reshape(())
    with pytest.raises(ValueError, match=r"scale shape \[2\] is not a scale .*expects \[1\] or \[1, 1\] or \[\]"):
        layer.weight_loader(layer.w13_weight_scale, torch.tensor([0.1, 0.2]), "w1", 1)  # [2]: a fused gate_up's
    layer.weight_loader(layer.w13_weight_scale, torch.tensor([0.1, 0.2]), None, 2)
    assert layer.w13_weight_scale[2].tolist() == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize("bad, match", [(-1.0, "negative weight scale"), (float("nan"), "non-finite values"),
                                        (float("inf"), "non-finite values")])
def test_bad_scale_values_are_refused_before_anything_is_recorded(bad, match):
    layer = _layer()
    s = _q(_weights()[2][0], BLOCK)[1].clone()
    s[2, 1] = bad
    with pytest.raises(ValueError, match=rf"{NAME}: w2_weight_scale expert 0 shard 'w2': {match} \(first at index "
                                         r"\[2, 1\]"):
        layer.weight_loader(layer.w2_weight_scale, s, "w2", 0)
    assert layer.load_state == "fresh" and torch.equal(layer.w2_weight_scale, torch.ones_like(layer.w2_weight_scale))


def _checkpoint(ws, qc=BLOCK):
    sd, P = {}, "model.layers.0.mlp."
    for e in range(E):
        for proj, w in zip(("gate_proj", "up_proj", "down_proj"), ws):
            q, s = _q(w[e], qc)
            sd[f"{P}experts.{e}.{proj}.weight"], sd[f"{P}experts.{e}.{proj}.weight_scale_inv"] = q, s
    return sd


def test_prequantized_stream_dying_midway_tears_then_a_complete_reload_heals_in_place():
    qc = Fp8Config("block", block_shape=(16, 16))  # I = 48: gate and up pieces fill whole tile rows
    model = MoEModel(1, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_checkpoint(model, _checkpoint(_weights(0), qc), progress=False)
    finalize_loading(model)
    layer = model.layers[0].experts
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    new = _checkpoint(_weights(1), qc)

    def stream(stop):
        for i, item in enumerate(new.items()):
            if i == stop:
                raise RuntimeError("trainer died")
            yield item

    with pytest.raises(RuntimeError, match="trainer died"):
        load_checkpoint(model, stream(13), progress=False)  # mid expert 2: a weight without its scale
    assert layer.is_torn and layer.staging_bytes == 0
    with pytest.raises(TornWeightsError, match="trainer died"):
        model(torch.randn(3, H))
    report = reload_weights(model, iter(list(new.items())))
    assert report.layer_status == {"layers.0.experts": "reloaded"} and not layer.is_torn
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs
    ref = MoEModel(1, E, K, H, I, quant_config=qc, params_dtype=torch.float32)
    load_checkpoint(ref, new, progress=False)
    finalize_loading(ref)
    for n, p in layer.named_parameters():
        assert torch.equal(p.view(torch.uint8), ref.layers[0].experts.get_parameter(n).view(torch.uint8)), n
