"""The op contract: pinned schemas, ``torch.library.opcheck`` on every op (default utils + static AOT dispatch),
``torch.compile(fullgraph=True, dynamic=True)`` with no recompiles over T, and namespace-collision safety."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

import torch_moe_ops
from torch_moe_ops.testing import random_moe_weights

from ._data import padded, random_expert_map, random_ids, random_weights

try:
    from expecttest import TestCase
except ImportError:  # pragma: no cover
    TestCase = None

pytestmark = pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # from opcheck internals

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic",
         "test_aot_dispatch_static")
E, H, I, T, K = 8, 72, 40, 7, 2


# ----------------------------------------------------------------------------------------------- (a) schemas

@pytest.mark.skipif(TestCase is None, reason="expecttest is not installed")
class TestSchemas(TestCase if TestCase is not None else object):
    """Changing a schema breaks callers and serialized graphs: update these on purpose (EXPECTTEST_ACCEPT=1)."""

    def test_op_names(self):
        self.assertExpectedInline(" ".join(sorted(torch_moe_ops.OP_NAMES)), """act_and_mul align_block_size fused_experts fused_moe linear moe_sum quantize_activation quantize_weight quantize_weight_into topk_route""")

    def test_topk_route(self):
        self.assertExpectedInline(str(torch.ops.moe.topk_route.default._schema), """moe::topk_route(Tensor router_logits, int top_k, bool renormalize=True, str scoring_func="softmax", int num_expert_group=0, int topk_group=0, Tensor? e_score_correction_bias=None, *, float routed_scaling_factor=1.) -> (Tensor topk_weights, Tensor topk_ids)""")

    def test_align_block_size(self):
        self.assertExpectedInline(str(torch.ops.moe.align_block_size.default._schema), """moe::align_block_size(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_map=None) -> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_padded)""")

    def test_act_and_mul(self):
        self.assertExpectedInline(str(torch.ops.moe.act_and_mul.default._schema), """moe::act_and_mul(Tensor x, str activation="silu", float? alpha=None, float? limit=None) -> Tensor""")

    def test_moe_sum(self):
        self.assertExpectedInline(str(torch.ops.moe.moe_sum.default._schema), """moe::moe_sum(Tensor x) -> Tensor""")

    def test_quantize_weight(self):
        self.assertExpectedInline(str(torch.ops.moe.quantize_weight.default._schema), """moe::quantize_weight(Tensor w, str scheme, int[]? block_shape=None, int shards=1) -> (Tensor qweight, Tensor scale)""")

    def test_quantize_weight_into(self):
        self.assertExpectedInline(str(torch.ops.moe.quantize_weight_into.default._schema), """moe::quantize_weight_into(Tensor w, Tensor(a!) qweight, Tensor(b!) scale, str scheme, int[]? block_shape=None, int shards=1) -> ()""")

    def test_quantize_activation(self):
        self.assertExpectedInline(str(torch.ops.moe.quantize_activation.default._schema), """moe::quantize_activation(Tensor x, str scheme, int group_size=128) -> (Tensor q, Tensor scale)""")

    def test_fused_experts(self):
        self.assertExpectedInline(str(torch.ops.moe.fused_experts.default._schema), """moe::fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, str activation="silu", str quant_scheme="none", Tensor? w13_scale=None, Tensor? w2_scale=None, Tensor? w13_bias=None, Tensor? w2_bias=None, int[]? block_shape=None, Tensor? expert_map=None, *, bool apply_router_weight_on_input=False, float? activation_alpha=None, float? activation_limit=None, bool batch_invariant=False) -> Tensor""")

    def test_fused_moe(self):
        self.assertExpectedInline(str(torch.ops.moe.fused_moe.default._schema), """moe::fused_moe(Tensor hidden_states, Tensor router_logits, Tensor w13, Tensor w2, int top_k, bool renormalize=True, str scoring_func="softmax", int num_expert_group=0, int topk_group=0, Tensor? e_score_correction_bias=None, float routed_scaling_factor=1., str activation="silu", str quant_scheme="none", Tensor? w13_scale=None, Tensor? w2_scale=None, Tensor? w13_bias=None, Tensor? w2_bias=None, int[]? block_shape=None, Tensor? expert_map=None, *, bool apply_router_weight_on_input=False, float? activation_alpha=None, float? activation_limit=None, bool batch_invariant=False) -> Tensor""")


# ----------------------------------------------------------------------------------------------- (b) opcheck

def _q(w, scheme, **kw):
    return torch_moe_ops.quantize_weight(w, scheme, **kw)


def _experts_case(scheme="none", dtype=torch.bfloat16, activation="silu", bias=False, emap=False, strided=False,
                  on_input=False, block_shape=None, limit=0.0):
    gated = not activation.endswith("_no_mul")
    w13, w2, b13, b2 = random_moe_weights(E, H, I, gated=gated, dtype=torch.float32, bias=bias)
    s13 = s2 = None
    if scheme == "none":
        w13, w2 = w13.to(dtype), w2.to(dtype)
    else:
        ws = {"fp8_tensor": "fp8_tensor", "fp8_channel": "fp8_channel", "fp8_block": "fp8_block",
              "int8_w8a16": "int8_channel"}[scheme]
        (w13, s13), (w2, s2) = (_q(w13, ws, block_shape=block_shape, shards=2 if ws == "fp8_tensor" and gated else 1),
                                _q(w2, ws, block_shape=block_shape))
    if strided:
        w13, w2 = padded(w13), padded(w2)
    E_route = 2 * E if emap else E
    args = (torch.randn(T, H).to(dtype) / 10, w13, w2, random_weights(T, K), random_ids(T, K, E_route), activation,
            scheme, s13, s2, b13, b2, block_shape, random_expert_map(E_route, E) if emap else None)
    return args, dict(apply_router_weight_on_input=on_input, activation_limit=limit)


def _opcheck_cases():
    moe = torch.ops.moe
    w = torch.randn(3, 80, 72) / 10
    cases = [
        ("topk_route-softmax", moe.topk_route.default, (torch.randn(T, 16), 2), {}),
        ("topk_route-T1-bf16", moe.topk_route.default, (torch.randn(1, 16).bfloat16(), 4, False), {}),
        ("topk_route-grouped-bias", moe.topk_route.default,
         (torch.randn(T, 16), 2, True, "sigmoid", 4, 2, torch.randn(16)), dict(routed_scaling_factor=2.5)),
        ("align", moe.align_block_size.default, (random_ids(T, K, E), E, 16), {}),
        ("align-expert_map", moe.align_block_size.default, (random_ids(T, K, 16), 16, 4, random_expert_map(16, 8)), {}),
        ("align-int64", moe.align_block_size.default, (random_ids(T, 6, 60, dtype=torch.int64), 60, 32), {}),
        ("act-silu-bf16", moe.act_and_mul.default, (torch.randn(T, 80).bfloat16(),), {}),
        ("act-swigluoai", moe.act_and_mul.default, (torch.randn(T, 80), "swigluoai", 1.702, 7.0), {}),
        ("act-gelu_no_mul-3d", moe.act_and_mul.default, (torch.randn(T, 2, 40), "gelu_no_mul"), {}),
        ("act-strided-rows", moe.act_and_mul.default, (padded(torch.randn(T, 80)), "gelu"), {}),
        ("act-permuted-3d", moe.act_and_mul.default, (torch.randn(2, T, 80).transpose(0, 1), "silu"), {}),
        ("act-permuted-3d-no_mul", moe.act_and_mul.default,
         (torch.randn(2, T, 80).transpose(0, 1), "relu2_no_mul"), {}),
        ("sum", moe.moe_sum.default, (torch.randn(T, K, H),), {}),
        ("sum-bf16", moe.moe_sum.default, (torch.randn(T, 6, H).bfloat16(),), {}),
        ("sum-permuted", moe.moe_sum.default, (torch.randn(K, T, H).transpose(0, 1),), {}),
        ("qw-fp8_tensor-shards2", moe.quantize_weight.default, (w, "fp8_tensor", None, 2), {}),
        ("qw-fp8_block-32", moe.quantize_weight.default, (w.bfloat16(), "fp8_block", [32, 32]), {}),
        ("qw-int8-2d", moe.quantize_weight.default, (w[0], "int8_channel"), {}),
        ("qw-strided", moe.quantize_weight.default, (padded(w), "fp8_channel"), {}),
        ("qwi-fp8-uint8", moe.quantize_weight_into.default,
         (w, torch.empty(3, 80, 72, dtype=torch.uint8), torch.empty(3, 80), "fp8_channel"), {}),
        ("qwi-fp8_block-uint8", moe.quantize_weight_into.default,
         (w, torch.empty(3, 80, 72, dtype=torch.uint8), torch.empty(3, 3, 3), "fp8_block", [32, 32]), {}),
        ("qwi-fp8_tensor-uint8-2d", moe.quantize_weight_into.default,
         (w[0], torch.empty(80, 72, dtype=torch.uint8), torch.empty(2), "fp8_tensor", None, 2), {}),
        ("qwi-int8", moe.quantize_weight_into.default,
         (padded(w), torch.empty(3, 80, 72, dtype=torch.int8), torch.empty(3, 80), "int8_channel"), {}),
        ("qa-token", moe.quantize_activation.default, (torch.randn(T, H).bfloat16(), "fp8_token"), {}),
        ("qa-group32", moe.quantize_activation.default, (torch.randn(T, H), "fp8_group", 32), {}),
        ("qa-strided", moe.quantize_activation.default, (padded(torch.randn(T, H)), "fp8_group"), {}),
        ("linear-bias", moe.linear.default, (torch.randn(T, H), torch.randn(E, H), torch.randn(E)), {}),
        ("linear-invariant-bf16", moe.linear.default, (torch.randn(T, H).bfloat16(), torch.randn(E, H).bfloat16()),
         dict(batch_invariant=True)),
    ]
    experts = [
        ("fe-none-bf16", _experts_case()),
        ("fe-none-fp32-bias-expert_map", _experts_case(dtype=torch.float32, bias=True, emap=True)),
        ("fe-strided-gelu_no_mul", _experts_case(strided=True, activation="gelu_no_mul")),
        ("fe-fp8_tensor-swigluoai-on-input", _experts_case("fp8_tensor", activation="swigluoai", on_input=True,
                                                           limit=7.0)),
        ("fe-fp8_channel-bias", _experts_case("fp8_channel", bias=True)),
        ("fe-fp8_block-32", _experts_case("fp8_block", block_shape=[32, 32])),
        ("fe-int8_w8a16", _experts_case("int8_w8a16")),
    ]
    cases += [(name, moe.fused_experts.default, a, kw) for name, (a, kw) in experts]
    (x, w13, w2, *_), _ = _experts_case()
    q13, s13 = _q(w13.float(), "fp8_tensor", shards=2)
    q2, s2 = _q(w2.float(), "fp8_tensor")
    cases += [
        ("moe-none", moe.fused_moe.default, (x, torch.randn(T, E), w13, w2, K), {}),
        ("moe-grouped-fp8_tensor", moe.fused_moe.default,
         (x, torch.randn(T, E), q13, q2, K, True, "sigmoid", 4, 2, torch.randn(E), 2.5, "silu", "fp8_tensor", s13, s2),
         {}),
    ]
    return [pytest.param(op, args, kw, id=name) for name, op, args, kw in cases]


@pytest.mark.parametrize("op,args,kwargs", _opcheck_cases())
def test_opcheck(op, args, kwargs):
    # test_schema compares every tensor input before/after with allclose, which has no CPU Float8 kernel: fp8
    # inputs (quantized weights) skip it; the int8 and uint8-view cases cover the schema of those ops.
    fp8_in = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    opcheck(op, args, kwargs, test_utils=UTILS[1:] if fp8_in else UTILS)


def test_opcheck_covers_every_op():
    covered = {p.values[0].name().split("::")[1] for p in _opcheck_cases()}
    assert covered == set(torch_moe_ops.OP_NAMES)


# ----------------------------------------------------------------------------------------------- (c) compile

def _compile_run(fn, make_inputs, Ts=(1, 2, 17, 64), backend="aot_eager", atol=0.0):
    """Compile once (token dim unbacked), run every T with recompiles turned into errors, compare with eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for i, t in enumerate(Ts):
            inputs = make_inputs(t)
            torch._dynamo.decorators.mark_unbacked(inputs[0], 0)
            got, want = compiled(*inputs), fn(*inputs)
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
            if i == 0:  # the first compile may restart its analysis once (Python float args): that is one frame
                first = counter.frame_count
    assert counter.frame_count == first, f"compiled again after T={Ts[0]}"
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn)) == 1, "more than one compiled entry"
    torch._dynamo.reset()


def _weights(scheme):
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.float32)
    gate = torch.randn(E, H) / 10
    if scheme == "none":
        return gate.bfloat16(), w13.bfloat16(), w2.bfloat16(), None, None
    kw = dict(block_shape=[32, 32]) if scheme == "fp8_block" else dict(shards=2) if scheme == "fp8_tensor" else {}
    (q13, s13), (q2, s2) = _q(w13, scheme, **kw), _q(w2, scheme, **({} if scheme == "fp8_tensor" else kw))
    return gate.bfloat16(), q13, q2, s13, s2


SCHEMES = [pytest.param("none", id="none"), pytest.param("fp8_channel", id="fp8_channel"),
           pytest.param("fp8_block", id="fp8_block-32")]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compile_fused_moe_no_recompiles(scheme):
    gate, w13, w2, s13, s2 = _weights(scheme)
    bs = [32, 32] if scheme == "fp8_block" else None

    def fn(x, gate, w13, w2, s13, s2):
        logits = x @ gate.t()
        return torch_moe_ops.fused_moe(x, logits, w13, w2, K, scoring_func="sigmoid", num_expert_group=4,
                                       topk_group=2, routed_scaling_factor=2.5, quant_scheme=scheme, w13_scale=s13,
                                       w2_scale=s2, block_shape=bs)

    _compile_run(fn, lambda t: (torch.randn(t, H).bfloat16() / 10, gate, w13, w2, s13, s2))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compile_modular_chain_no_recompiles(scheme):
    """router -> topk_route -> fused_experts (and the granular ops) as one graph, every T."""
    gate, w13, w2, s13, s2 = _weights(scheme)
    bs = [32, 32] if scheme == "fp8_block" else None

    def fn(x, gate, w13, w2, s13, s2):
        logits = (x @ gate.t()).float()
        w, ids = torch_moe_ops.topk_route(logits, K)
        out = torch_moe_ops.fused_experts(x, w13, w2, w, ids, quant_scheme=scheme, w13_scale=s13, w2_scale=s2,
                                          block_shape=bs)
        sorted_ids, expert_ids, npp = torch_moe_ops.align_block_size(ids, E, 16)
        h = torch_moe_ops.act_and_mul(torch.cat([x, x], dim=1))
        q, s = torch_moe_ops.quantize_activation(h, "fp8_token")
        return out, w, ids, sorted_ids, expert_ids, npp, q.view(torch.uint8), s, torch_moe_ops.moe_sum(x.view(-1, 1, H))

    _compile_run(fn, lambda t: (torch.randn(t, H).bfloat16() / 10, gate, w13, w2, s13, s2))


def test_compile_inductor_chain():
    """The same chain through Inductor (CPU C++ codegen) for the unquantized case, T in {1, 17}."""
    gate, w13, w2, _, _ = _weights("none")

    def fn(x):
        w, ids = torch_moe_ops.topk_route((x @ gate.t()).float(), K)
        return torch_moe_ops.fused_experts(x, w13, w2, w, ids) * 2 + 1

    _compile_run(fn, lambda t: (torch.randn(t, H).bfloat16() / 10,), Ts=(1, 17), backend="inductor", atol=1e-2)


# ------------------------------------------------------------------------------------------ (d) collisions

def _run(code, tmp_path, **files):
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


OTHER_CUSTOM_OP = """
    import torch

    @torch.library.custom_op("moe::fused_experts", mutates_args=())
    def fused_experts(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
"""
OTHER_LIBRARY_DEF = """
    import torch

    lib = torch.library.Library("moe", "DEF")
    lib.define("fused_experts(Tensor x, int k) -> Tensor")
"""


@pytest.mark.parametrize("module,text", [("other_moe_lib", OTHER_CUSTOM_OP),
                                         ("other_moe_cpp_style", OTHER_LIBRARY_DEF)], ids=["custom_op", "Library.define"])
def test_import_refuses_to_replace_a_foreign_op(tmp_path, module, text):
    r = _run(f"import {module}\nimport torch_moe_ops\n", tmp_path, **{module: text})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError") and "moe::fused_experts" in last, r.stderr[-2000:]
    if module == "other_moe_lib":
        assert "other_moe_lib" in last, last


def test_neighbour_ops_leave_our_schemas_alone(tmp_path):
    """A library that registered other moe:: ops first (moe::permute, moe::grouped_gemm) coexists with ours."""
    ours = {name: str(getattr(torch.ops.moe, name).default._schema) for name in torch_moe_ops.OP_NAMES}
    neighbour = """
        import torch

        @torch.library.custom_op("moe::permute", mutates_args=())
        def permute(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return x[idx]

        lib = torch.library.Library("moe", "DEF")
        lib.define("grouped_gemm(Tensor a, Tensor b) -> Tensor")
    """
    code = """
        import importlib, json, sys
        import moe_neighbour, torch
        import torch_moe_ops
        importlib.reload(sys.modules["torch_moe_ops.ops.fused_moe"])  # re-importing our own module: no conflict
        from torch_moe_ops.ops._registry import REGISTERED
        schemas = {n: str(getattr(torch.ops.moe, n).default._schema) for n in torch_moe_ops.OP_NAMES}
        mine = all(torch._library.custom_ops.OPDEFS[q] is op for q, op in REGISTERED.items())
        x = torch.arange(4.0)
        print(json.dumps(dict(schemas=schemas, mine=mine,
                              permute=torch.ops.moe.permute(x, torch.tensor([3, 0])).tolist())))
    """
    r = _run(code, tmp_path, moe_neighbour=neighbour)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["schemas"] == ours and got["mine"] and got["permute"] == [3.0, 0.0]
