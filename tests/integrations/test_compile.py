"""``torch.compile(fullgraph=True, dynamic=True)``: one graph for every sequence length (no recompile), no graph
break (fullgraph raises on any), the routed experts as torch.ops.moe ops in the graph."""
import pytest
import torch
import torch._dynamo.testing
from torch import nn
from torch._dynamo.utils import counters

from tests.hf_models import H, first, hf_blocks, make, patched_copy

pytest.importorskip("transformers")

SEQ = (3, 5, 9, 17)  # B = 2; S = 2 would be duck-sized onto B


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    yield


def _moe_ops(graph):
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    ours = (torch.ops.moe.fused_moe, torch.ops.moe.fused_experts, torch.ops.moe.fused_moe.default,
            torch.ops.moe.fused_experts.default)
    return sum(t in ours for t in targets)


def test_whole_model_one_graph():
    """Dynamo's graph (backend "eager": tracing a transformers model through AOT autograd costs ~20 s on CPU;
    the blocks below and tests/layer/test_compile.py cover aot_eager)."""
    ours, report = patched_copy(make("mixtral"))
    counter = torch._dynamo.testing.EagerAndRecordGraphs()
    compiled = torch.compile(ours, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for S in SEQ:
            ids = torch.randint(0, 96, (2, S))
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, ours(ids, use_cache=False).logits,
                                       rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert _moe_ops(counter.graphs[-1]) == len(report.replaced)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text", "phimoe"])
def test_block_one_graph(model_type):
    """Each forward shape of MoEBlock: gated shared expert, grouped routing + fp32 router, pair output with
    biases, on-input weights + flat pair output, the SparseMixer routing hook."""
    holder = nn.ModuleDict({"mlp": hf_blocks(make(model_type))[0]})  # no transformers output hooks on it
    from torch_moe_ops.integrations.transformers import patch

    patch(holder)
    block = holder["mlp"]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for S in SEQ:
            x = torch.randn(2, S, H)
            torch.testing.assert_close(first(compiled(x)), first(block(x)), rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and _moe_ops(counter.graphs[-1]) == 1
