"""A model of several FusedMoE layers compiles once: fullgraph, dynamic token count, every scheme."""
import pytest
import torch
import torch._dynamo.testing
import torch.fx.experimental._config as fx_config
from torch import nn
from torch._dynamo.utils import counters

from torch_moe_ops.quantization import Fp8Config

from tests.moe_models import SCHEMES, hf_checkpoint, loaded_model

L, E, K, H, I = 3, 8, 2, 64, 48
TOKENS = (1, 2, 17, 33)


def _model(scheme, **kw):
    return loaded_model(hf_checkpoint(L, E, H, I), num_layers=L, quant_config=SCHEMES[scheme], **kw)


def _run(compiled, model, tokens, *, exact=True, mark_unbacked=False):
    for T in tokens:
        x = torch.randn(T, H, dtype=torch.bfloat16) / 2
        if mark_unbacked:
            torch._dynamo.decorators.mark_unbacked(x, 0)
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        if exact:
            torch.testing.assert_close(out, ref, atol=0, rtol=0)
        else:
            torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    yield


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_graph_for_all_layers_and_token_counts(scheme):
    """backed_size_oblivious keeps T = 1 from being specialized (0/1 specialization), so T in {1, 2, 17, 33}
    share one graph; the three layers are traced into it with no per-layer artefacts."""
    model = _model(scheme, use_correction_bias=False)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with fx_config.patch(backed_size_oblivious=True), torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, TOKENS)
    assert counters["stats"]["unique_graphs"] == 1
    graph = counter.graphs[-1]
    ops = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moe.fused_moe) == L
    assert not any("layers" in str(t) for t in ops)  # no layer names in the graph's ops


@pytest.mark.parametrize("scheme", ["none", "fp8_block"])
def test_plain_dynamic_and_mark_unbacked(scheme):
    """Without flags, dynamic=True compiles once for T >= 2; marking T unbacked covers T = 1 as well."""
    model = _model(scheme)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, (2, 17, 33))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, TOKENS, mark_unbacked=True)
    assert counters["stats"]["unique_graphs"] == 1


class _Modular(nn.Module):
    """The modular form: route, then experts, with user code in between."""

    def __init__(self, moe_model):
        super().__init__()
        self.inner = moe_model

    def forward(self, x):
        for block in self.inner.layers:
            weights, ids = block.experts.select_experts(block.gate(x))
            x = x + block.experts.forward_experts(x, weights * 1.0, ids)
        return x


@pytest.mark.parametrize("scheme", ["fp8_tensor", "int8_w8a16"])
def test_modular_form_compiles_once(scheme):
    model = _Modular(_model(scheme))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with fx_config.patch(backed_size_oblivious=True), torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, TOKENS)
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor():
    model = _model("fp8_tensor")
    compiled = torch.compile(model, backend="inductor", fullgraph=True, dynamic=True)
    with fx_config.patch(backed_size_oblivious=True), torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, TOKENS, exact=False)
    assert counters["stats"]["unique_graphs"] == 1


def test_layers_with_different_configs_share_the_graph():
    """Per-layer configs are constants of the one graph; e.g. layer 0 fp8 block, layer 1 unquantized."""
    model = _model("none")
    fp8 = loaded_model(hf_checkpoint(1, E, H, I), num_layers=1, quant_config=Fp8Config("block", block_shape=(32, 32)))
    model.layers[0] = fp8.layers[0]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with fx_config.patch(backed_size_oblivious=True), torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, model, TOKENS)
    assert counters["stats"]["unique_graphs"] == 1
