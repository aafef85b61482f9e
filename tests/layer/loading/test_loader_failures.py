"""A refused or failed ``weight_loader`` / ``load_weights`` call records and writes nothing (``layer/loading/``;
docs/online-quantization.md, "Failed loads"): bad calls at every stage of a load, ``load_weights`` all or
nothing, a write that raises is not counted as loaded, non-finite values named once, also on CUDA tensors
(model-level loads: tests/checkpoint/test_passes.py)."""
import pytest
import torch

from torch_moe_ops.errors import LoadError
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.layer.loading import WeightLoader
from torch_moe_ops.quantization import Fp8Config, Int8WeightOnlyConfig
from torch_moe_ops.testing import random_moe_weights

E, K, H, I = 3, 2, 64, 32


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


@pytest.mark.cuda
def test_cuda_checkpoint_nan_is_caught_at_load():
    w13, w2, _, _ = random_moe_weights(E, H, I, device="cuda")
    w2[1, 3, 2] = float("nan")
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config(), device="cuda")
    where = r"w2_weight expert 1 shard 'w2': non-finite values \(first at index \[1, 3, 2\]: nan\)"
    with pytest.raises(ValueError, match=where):  # a device tensor: checked at load time (one sync per tensor)
        layer.load_weights(w13, w2)
    assert layer.load_state == "fresh"


def test_nan_through_weight_loader_says_this_call_wrote_nothing():
    layer = FusedMoE(E, K, H, I)
    w = torch.randn(H, I)
    w[1, 2] = float("nan")
    before = {n: t.view(torch.uint8).clone() for n, t in layer.state_dict().items()}
    with pytest.raises(ValueError) as err:
        layer.weight_loader(layer.w2_weight, w, "w2", 1)
    msg = str(err.value)
    assert msg.endswith("w2_weight expert 1 shard 'w2': non-finite values (first at index [1, 2]: nan); "
                        "this weight_loader call wrote nothing"), msg
    assert msg.count("nothing") == 1 and "nothing of this tensor" not in msg
    with pytest.raises(ValueError, match=r"nan\) \(checkpoint tensor 'experts.1.down_proj.weight'\); "
                                         r"this weight_loader call wrote nothing$"):
        layer.weight_loader(layer.w2_weight, w, weight_name="experts.1.down_proj.weight", shard_id="w2", expert_id=1)
    assert all(torch.equal(t.view(torch.uint8), before[n]) for n, t in layer.state_dict().items())
    assert layer.load_state == "fresh"
