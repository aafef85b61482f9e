"""Compiled graphs carry ``_platform.trace_state()`` (ops/_registry.mark_traced, docs/compile.md "Caches"):
torch's compiled-artifact caches key on the Dynamo graph, so without it a graph traced under one
``TORCH_MOE_OPS_COMPILE`` mode (or fusion switch, or an older package source) would be served to a process
that asked for another."""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import _platform
from torch_moe_ops._platform import COMPILE_ENV, FUSE_ACTIVATION_ENV
from torch_moe_ops.testing import random_moe_weights


def test_the_state_is_a_dynamo_constant():
    """What ``torch._dynamo.assume_constant_result`` marks is what ``_platform`` sets by hand (no Dynamo import
    at package import): if torch renames the attribute, this fails instead of Dynamo tracing os.environ."""
    def f():
        return ""

    marked = torch._dynamo.assume_constant_result(f)
    assert {k: v for k, v in vars(marked).items()} == {"_dynamo_marked_constant": True}
    assert _platform.trace_state._dynamo_marked_constant is True


def test_the_state_names_the_source_and_every_switch(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "triton")
    a = _platform.trace_state()
    monkeypatch.setenv(COMPILE_ENV, "plans")
    monkeypatch.setenv(FUSE_ACTIVATION_ENV, "1")
    b = _platform.trace_state()
    assert a != b and f"{COMPILE_ENV}=plans" in b and f"{FUSE_ACTIVATION_ENV}=1" in b
    assert a.split(";")[0] == b.split(";")[0] and len(a.split(";")[0]) == 16  # the sources' digest


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("via", ["function", "layer"])
def test_compiled_graphs_carry_the_state_and_miss_the_cache_when_it_changes(via, device, monkeypatch, fresh_dynamo,
                                                                            tmp_path):
    """The Dynamo graph holds the marker with the state (public function and layer alike); Inductor drops it
    (no launch, no call in the generated code); changing a switch misses AOTAutograd's cache, which an
    unchanged one hits. On the GPU too: the GPU's torch may trace differently (torch 2.11's Dynamo folded
    ``torch.compiler.is_exporting()`` to True, which dropped the marker there and served triton-mode graphs to
    plans-mode calls in the H100 suite of 2026-12-07)."""
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache, this test's own
    E, k, H, I = 4, 2, 32, 16
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.float32, device=device)
    if via == "layer":
        layer = moe.FusedMoE(E, k, H, I, params_dtype=torch.float32, device=device)
        for e in range(E):
            layer.weight_loader(layer.w13_weight, w13[e, :I], "w1", e)
            layer.weight_loader(layer.w13_weight, w13[e, I:], "w3", e)
            layer.weight_loader(layer.w2_weight, w2[e], "w2", e)
        moe.finalize_loading(layer)
        fn = layer
    else:
        def fn(x, logits):
            return moe.fused_moe(x, logits, w13, w2, k)
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return compile_fx(gm, example_inputs)

    x, logits = torch.randn(3, H, device=device), torch.randn(3, E, device=device)
    results = []
    for switch in ("0", "0", "1"):
        monkeypatch.setenv(FUSE_ACTIVATION_ENV, switch)
        torch._dynamo.reset()
        counters.clear()
        results.append(torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)(x, logits))
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        assert f"{FUSE_ACTIVATION_ENV}={switch}" in codes[-1] and "moe._trace_state" in codes[-1]
        assert hits == (1 if len(results) == 2 else 0), (switch, dict(counters["aot_autograd"]))
    for r in results:  # (the fused activation rounds like the separate one on the CPU; on the GPU, see its tests)
        torch.testing.assert_close(r, results[0])


def test_an_exported_program_has_no_marker():
    """torch.export caches nothing of ours, and its program would keep the marker node: none there."""
    E, k, H, I = 4, 2, 32, 16
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, x, logits):
            return moe.fused_moe(x, logits, w13, w2, k)

    for strict in (False, True):  # (strict: traced by Dynamo, which must see the export flag)
        ep = torch.export.export(M(), (torch.randn(3, H), torch.randn(3, E)), strict=strict)
        assert [str(n.target) for n in ep.graph.nodes if n.op == "call_function"] == ["moe.fused_moe.default"]
