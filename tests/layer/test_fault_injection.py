"""Fault injection into reloads (docs/online-quantization.md, "Failed loads"): a bad tensor at EVERY position.

From a source that can be read again (dict, list of pairs) a failed reload writes nothing: weights, scales,
biases, the correction bias and the router stay bitwise intact and forward gives the old output. From a
one-shot iterator a failure after the first write tears the model (forward raises naming the failed
reload) until a later complete reload heals it. Every outcome is counted and the counts are checked.
"""
from collections import Counter

import pytest
import torch

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.errors import LoadError, TornWeightsError
from torch_moe_ops.quantization import Fp8Config, Int4Config, Int8WeightOnlyConfig

from tests.moe_models import MoEModel, moe_layers

E, K, H, I, T = 3, 2, 64, 32, 5
SCHEMES = {"none": None, "fp8_tensor": Fp8Config("tensor"), "fp8_block": Fp8Config("block", block_shape=(32, 32)),
           "int8_w8a16": Int8WeightOnlyConfig(), "int4_w4a16": Int4Config(32)}
FAULTS = ("shape", "dtype", "prequantized", "nan", "inf", "meta", "missing")
#: the stream test heals with a full reload after every tear: the issue's five kinds (the others fail the same
#: per-tensor check, covered from re-readable sources and by test_load_failures.py)
STREAM_FAULTS = ("shape", "dtype", "nan", "inf", "missing")
P = "model.layers.0.mlp."
_PIECE = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}


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
