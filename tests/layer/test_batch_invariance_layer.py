"""``FusedMoE(batch_invariant=...)`` (docs/batch-invariance.md): the layer's setting, the process-wide switch,
the flag reaching the op eager and compiled (a flip of the switch retraces once), pickling, the property."""
import copy
import pickle

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.utils import counters

import torch_moe_ops
from torch_moe_ops.testing import batch_variance

from tests.layer._layer import CONFIGS, _loaded, _x


@pytest.fixture
def seen(invariant_calls) -> list:
    return invariant_calls


def test_setting_follows_the_switch_unless_set(seen):
    layer = _loaded()
    assert layer.batch_invariant is None and layer.invariant() is False
    x, logits = _x(4)
    layer(x, logits)
    with torch_moe_ops.batch_invariant():
        layer(x, logits)
        layer.batch_invariant = False
        layer(x, logits)
    layer.batch_invariant = True
    layer(x, logits)
    assert seen == [False, True, False, True]
    with pytest.raises(TypeError, match="batch_invariant must be True, False or None"):
        layer.batch_invariant = 1
    assert layer.batch_invariant is True  # a refused value changes nothing
    with pytest.raises(TypeError, match="batch_invariant must be True, False or None"):
        _loaded(batch_invariant="on")


def test_pickle_and_deepcopy_keep_the_setting():
    layer = _loaded(batch_invariant=True)
    assert copy.deepcopy(layer).batch_invariant is True
    assert pickle.loads(pickle.dumps(layer)).batch_invariant is True
    state = layer.__dict__.copy()
    del state["_batch_invariant"]  # a layer pickled before the setting existed
    old = torch_moe_ops.FusedMoE.__new__(torch_moe_ops.FusedMoE)
    old.__setstate__(state)
    assert old.batch_invariant is None


def test_saving_forward_passes_the_flag(seen):
    """Trainable layers with saved activations run the saving op; it gets the mode too."""
    layer = _loaded(trainable=True, save_activations=True, batch_invariant=True)
    x, logits = _x(5)
    layer(x.requires_grad_(), logits).sum().backward()
    assert seen == [True]


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layer_retraces_once_when_the_switch_flips(seen):
    """The switch is a Python global read in the traced forward: Dynamo guards on it. One graph per mode, and
    each graph passes its mode to the op (the compiled output equals eager bitwise)."""
    layer = _loaded()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for T in (3, 9):
        x, logits = _x(T)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, logits), layer(x, logits), atol=0, rtol=0)
    seen.clear()
    frames = counter.frame_count
    with torch_moe_ops.batch_invariant(), torch.no_grad():
        for T in (3, 9):
            x, logits = _x(T)
            torch.testing.assert_close(compiled(x, logits), layer(x, logits), atol=0, rtol=0)
    assert seen and all(seen)
    assert counter.frame_count == frames + 1, counters["stats"]  # one retrace, for both T
    graph = counter.graphs[-1]
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.moe.fused_moe.default
             or n.target is torch.ops.moe.fused_moe]
    assert calls and all(n.kwargs.get("batch_invariant") is True for n in calls)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_rows_do_not_depend_on_the_batch(config):
    layer = _loaded(CONFIGS[config], batch_invariant=True)
    x, logits = _x(40)
    with torch.no_grad():
        got = batch_variance(layer, (x, logits), sizes=(1, 7, 19))
    assert all(bad == 0 for bad, _ in got.values()), got


@pytest.mark.usefixtures("fresh_dynamo")
def test_context_manager_inside_a_compiled_function(seen):
    """``with batch_invariant():`` inside a fullgraph-compiled function: traced, restored after, the call in it
    takes the mode."""
    layer = _loaded()
    x, logits = _x(6)

    def fn(x, logits):
        with torch_moe_ops.batch_invariant():
            return layer(x, logits)

    with torch.no_grad():
        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, logits)
        assert seen and all(seen)
        layer.batch_invariant = True
        want = layer(x, logits)
    assert not torch_moe_ops.is_batch_invariant()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
