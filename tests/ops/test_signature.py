"""The op boundary, defined once (docs/design.md §8.3): every ``moe::`` schema pinned; the schema, the
Python parameters, the launch-plan key and the autograd bindings all derived from one ``Signature``; the
layer passes canonical scheme names, decoded by a dict lookup."""
import importlib
import inspect

import pytest
import torch

import torch_moe_ops
from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.ops._registry import REGISTERED
from torch_moe_ops.ops.autograd import EXPERTS_BACKWARD, EXPERTS_TRAIN
from torch_moe_ops.ops.routing import TOPK_ROUTE
from torch_moe_ops.ops.signature import Signature, args
from torch_moe_ops.schemes import QUANT_SCHEMES, get_quant_scheme
from torch_moe_ops.testing import random_moe_weights

#: the module (the attribute torch_moe_ops.ops.fused_moe is the function)
F = importlib.import_module("torch_moe_ops.ops.fused_moe")

_EXPERT_OPTIONS = ('str activation="silu", str quant_scheme="none", Tensor? w13_scale=None, Tensor? w2_scale=None, '
                   'Tensor? w13_bias=None, Tensor? w2_bias=None, int[]? block_shape=None, Tensor? expert_map=None, *, '
                   'bool apply_router_weight_on_input=False, float? activation_alpha=None, '
                   'float? activation_limit=None, bool batch_invariant=False')
#: every op this package registers, public and private: a change here is a deliberate contract change
SCHEMAS = {
    "topk_route": 'moe::topk_route(Tensor router_logits, int top_k, bool renormalize=True, str scoring_func="softmax", '
                  'int num_expert_group=0, int topk_group=0, Tensor? e_score_correction_bias=None, *, '
                  'float routed_scaling_factor=1.) -> (Tensor topk_weights, Tensor topk_ids)',
    "align_block_size": "moe::align_block_size(Tensor topk_ids, int num_experts, int block_size, "
                        "Tensor? expert_map=None) -> (Tensor sorted_token_ids, Tensor expert_ids, "
                        "Tensor num_tokens_post_padded)",
    "act_and_mul": 'moe::act_and_mul(Tensor x, str activation="silu", float? alpha=None, float? limit=None) -> Tensor',
    "moe_sum": "moe::moe_sum(Tensor x) -> Tensor",
    "linear": "moe::linear(Tensor x, Tensor weight, Tensor? bias=None, *, bool batch_invariant=False) -> Tensor",
    "quantize_weight": "moe::quantize_weight(Tensor w, str scheme, int[]? block_shape=None, int shards=1) -> "
                       "(Tensor qweight, Tensor scale)",
    "quantize_weight_into": "moe::quantize_weight_into(Tensor w, Tensor(a!) qweight, Tensor(b!) scale, str scheme, "
                            "int[]? block_shape=None, int shards=1) -> ()",
    "quantize_activation": "moe::quantize_activation(Tensor x, str scheme, int group_size=128) -> (Tensor q, "
                           "Tensor scale)",
    "fused_experts": "moe::fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, "
                     f"Tensor topk_ids, {_EXPERT_OPTIONS}) -> Tensor",
    "fused_moe": "moe::fused_moe(Tensor hidden_states, Tensor router_logits, Tensor w13, Tensor w2, int top_k, "
                 'bool renormalize=True, str scoring_func="softmax", int num_expert_group=0, int topk_group=0, '
                 f"Tensor? e_score_correction_bias=None, float routed_scaling_factor=1., {_EXPERT_OPTIONS}) -> Tensor",
    "_fused_experts_train": "moe::_fused_experts_train(Tensor hidden_states, Tensor w13, Tensor w2, "
                            f"Tensor topk_weights, Tensor topk_ids, {_EXPERT_OPTIONS}) -> (Tensor out, Tensor c1)",
    "_fused_experts_backward": "moe::_fused_experts_backward(Tensor grad_out, Tensor hidden_states, Tensor w13, "
                               "Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor? c1, str activation, "
                               "str quant_scheme, Tensor? w13_scale, Tensor? w2_scale, Tensor? w13_bias, "
                               "Tensor? w2_bias, int[]? block_shape, Tensor? expert_map, "
                               "bool apply_router_weight_on_input, float? activation_alpha, "
                               "float? activation_limit, bool batch_invariant, bool[] needs) -> "
                               "(Tensor grad_hidden_states, "
                               "Tensor grad_w13, Tensor grad_w2, Tensor grad_w13_bias, Tensor grad_w2_bias, "
                               "Tensor grad_topk_weights)",
}
SIGNATURES = [F.FUSED_EXPERTS, F.FUSED_MOE, TOPK_ROUTE, EXPERTS_TRAIN, EXPERTS_BACKWARD]


INFERENCE_SCHEMAS = {
    "moe::_fused_experts_inference": "moe::_fused_experts_inference(Tensor hidden_states, Tensor w13, Tensor w2, "
                                     "Tensor topk_weights, Tensor topk_ids, Tensor? w13_scale, Tensor? w2_scale, "
                                     "Tensor? w13_bias, Tensor? w2_bias, Tensor? expert_map, str options) -> Tensor",
    "moe::_fused_moe_inference": "moe::_fused_moe_inference(Tensor hidden_states, Tensor router_logits, Tensor w13, "
                                 "Tensor w2, Tensor? e_score_correction_bias, Tensor? w13_scale, Tensor? w2_scale, "
                                 "Tensor? w13_bias, Tensor? w2_bias, Tensor? expert_map, str options) -> Tensor",
}


def test_the_inference_twins_take_tensors_positionally_and_the_rest_in_one_string():
    """No argument with a default: Inductor passes those by keyword, which the dispatcher matches by name on every
    call (docs/host-overhead.md, "The lean op's schema")."""
    from torch_moe_ops.ops._registry import INFERENCE

    assert {q: str(op._schema) for q, op in INFERENCE.items()} == INFERENCE_SCHEMAS


@pytest.mark.parametrize("sig", [F.FUSED_EXPERTS, F.FUSED_MOE], ids=lambda s: s.name)
def test_the_twins_options_give_back_every_argument(sig):
    """Each non-tensor argument survives the string exactly: floats (NaN, infinities, values without a short decimal
    form), None, bools (not ints), lists (as tuples); the twin's generated kernel rebuilds the same ``Args``."""
    values = dict(top_k=3, renormalize=False, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
                  routed_scaling_factor=0.1 + 0.2, activation="swigluoai", quant_scheme="int4_w4a16",
                  block_shape=[1, 64], apply_router_weight_on_input=True, activation_alpha=float("nan"),
                  activation_limit=float("-inf"), batch_invariant=True)
    tensors = {n: torch.full((1,), float(i)) for i, n in enumerate(sig.tensors)}
    a = sig.Args(**tensors, **{n: values[n] for n in sig.names if n not in tensors})
    got = []
    twin = sig.inference_function(lambda b: got.append(b), "probe")
    call = sig.inference_args(a)
    assert call[:-1] == tuple(tensors.values()) and isinstance(call[-1], str)
    twin(*call)
    b = got[0]
    for name in sig.names:
        want, have = getattr(a, name), getattr(b, name)
        if name in tensors:
            assert have is want, name
        elif isinstance(want, float) and want != want:
            assert have != have, name
        else:
            assert have == (tuple(want) if isinstance(want, list) else want) and type(have) is type(
                tuple(want) if isinstance(want, list) else want), (name, have, want)


def test_an_options_string_from_another_version_is_refused_by_name():
    with pytest.raises(RuntimeError, match=r"options must name \['top_k'.*got \['top_k'\]"):
        F.FUSED_MOE.decode_options('{"top_k":8}')
    with pytest.raises(RuntimeError, match="options must name .* got 'top_k=8', not a JSON object"):
        F.FUSED_MOE.decode_options("top_k=8")  # not JSON


def test_every_moe_schema_is_pinned():
    assert sorted(q.split("::")[1] for q in REGISTERED) == sorted(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.moe, name).default._schema) == schema, name


@pytest.mark.parametrize("sig", SIGNATURES, ids=lambda s: s.name)
def test_the_registered_schema_is_the_signatures(sig):
    """What torch parsed from ``sig.schema`` prints back as the pinned string, argument by argument."""
    parsed = torch._C.parse_schema(f"moe::{sig.name}{sig.schema}")
    assert str(parsed) == SCHEMAS[sig.name]
    assert [(a.name, a.kwarg_only) for a in parsed.arguments] == [(a.name, a.kw_only) for a in sig.args]
    for arg, a in zip(parsed.arguments, sig.args):  # defaults as torch reads them = the Python parameters'
        assert (arg.default_value if a.default is not None else None) == (None if a.default is None else a.value)


@pytest.mark.parametrize("fn, sig, positional", [(torch_moe_ops.fused_experts, F.FUSED_EXPERTS, 5),
                                                 (torch_moe_ops.fused_moe, F.FUSED_MOE, 5),
                                                 (torch_moe_ops.topk_route, TOPK_ROUTE, 2)],
                         ids=["fused_experts", "fused_moe", "topk_route"])
def test_public_wrappers_are_keyword_only_after_the_first_arguments(fn, sig, positional):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == list(sig.names)
    kinds = [p.kind for p in params]
    assert kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * positional + [inspect.Parameter.KEYWORD_ONLY] * (
        len(params) - positional)
    for p, a in zip(params, sig.args):
        assert (p.default is inspect.Parameter.empty) == (a.default is None)
        if a.name == "batch_invariant":  # resolved by the wrapper: None follows torch_moe_ops.batch_invariant()
            assert p.default is None and a.value is False
            continue
        assert a.default is None or (p.default == a.value and type(p.default) is type(a.value))
    assert fn.__module__.startswith("torch_moe_ops.ops") and fn.__doc__.startswith(("Run", "Route", "Pick"))
    assert "[T, H]" in fn.__doc__ or "[T, E]" in fn.__doc__


def test_generated_functions_belong_to_the_package():
    """The collision check recognises our own op by its function's module (a reload must not refuse it)."""
    for q, op in REGISTERED.items():
        assert op._init_fn.__module__.startswith("torch_moe_ops"), q


def test_args_parser_refuses_what_it_cannot_render():
    with pytest.raises(ValueError, match="not a schema argument"):
        args("Tensor x, Dict[str, int] y")
    sig = Signature("probe", args("Tensor x, int[]? b=None, *, float s=1.0"), "Tensor")
    assert sig.schema == "(Tensor x, int[]? b=None, *, float s=1.0) -> Tensor"
    assert sig.positional == ("x", "b") and sig.keyword_only == ("s",) and sig.tensors == ("x",)


# ----------------------------------------------------------------------------------------------- plan keys
def _tensor_key(t):
    return None if t is None else ("sig", tuple(t.shape))


def _old_moe_key(hidden_states, router_logits, w13, w2, top_k, renormalize=True, scoring_func="softmax",
                 num_expert_group=0, topk_group=0, e_score_correction_bias=None, routed_scaling_factor=1.0,
                 activation="silu", quant_scheme="none", w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None,
                 block_shape=None, expert_map=None, *, apply_router_weight_on_input=False, activation_alpha=None,
                 activation_limit=None, batch_invariant=False):
    """The hand-written key of the first launch-plan cut, kept as the oracle (+ batch_invariant)."""
    inputs = [hidden_states, router_logits, w13, w2, e_score_correction_bias, w13_scale, w2_scale, w13_bias, w2_bias,
              expert_map]
    key = ("fused_moe", *map(_tensor_key, inputs), top_k, renormalize, scoring_func, num_expert_group, topk_group,
           routed_scaling_factor, activation, quant_scheme, None if block_shape is None else tuple(block_shape),
           apply_router_weight_on_input, activation_alpha, activation_limit, batch_invariant, 3)
    return key, inputs


def _old_experts_key(hidden_states, w13, w2, topk_weights, topk_ids, activation="silu", quant_scheme="none",
                     w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None, expert_map=None, *,
                     apply_router_weight_on_input=False, activation_alpha=None, activation_limit=None,
                     batch_invariant=False):
    inputs = [hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w13_bias, w2_bias, expert_map]
    key = ("fused_experts", *map(_tensor_key, inputs), activation, quant_scheme,
           None if block_shape is None else tuple(block_shape), apply_router_weight_on_input, activation_alpha,
           activation_limit, batch_invariant, 3)
    return key, inputs


def _t(*shape):
    return torch.zeros(shape)


@pytest.mark.parametrize("block_shape", [None, [128, 64]])
def test_plan_keys_cover_every_argument_like_the_hand_written_ones(block_shape):
    moe = (_t(3, 8), _t(3, 4), _t(4, 6, 8), _t(4, 8, 3), 2, False, "sigmoid", 2, 1, _t(4), 2.5, "gelu", "fp8_block",
           _t(4, 1, 1), _t(4, 1, 1), _t(4, 6), None, block_shape, _t(4))
    kw = dict(apply_router_weight_on_input=True, activation_alpha=1.5, activation_limit=6.0, batch_invariant=True)
    key, inputs = F.FUSED_MOE.plan_key(_tensor_key, lambda: 3)(F.FUSED_MOE.Args(*moe, **kw))
    old_key, old_inputs = _old_moe_key(*moe, **kw)
    assert key == old_key and len(key) == 1 + len(F.FUSED_MOE.names) + 1
    assert all(a is b for a, b in zip(inputs, old_inputs)) and len(inputs) == len(old_inputs) == 10
    hash(key)
    ex = (_t(3, 8), _t(4, 6, 8), _t(4, 8, 3), _t(3, 2), _t(3, 2), "silu", "int4_w4a16", _t(4, 6, 1), None, None,
          _t(4, 8), block_shape, None)
    key, inputs = F.FUSED_EXPERTS.plan_key(_tensor_key, lambda: 3)(F.FUSED_EXPERTS.Args(*ex, False, None, 7.0, False))
    old_key, old_inputs = _old_experts_key(*ex, activation_limit=7.0)
    assert key == old_key and all(a is b for a, b in zip(inputs, old_inputs)) and len(inputs) == 10


def test_a_generated_impl_binds_defaults_and_keywords_like_the_schema():
    seen = []
    fn = F.FUSED_MOE.function(seen.append, "probe")
    x = _t(1)
    fn(x, x, x, x, 1, activation_limit=2.0)
    a = seen[0]
    assert a.top_k == 1 and a.renormalize is True and a.scoring_func == "softmax" and a.activation_limit == 2.0
    assert a.routed_scaling_factor == 1.0 and a.block_shape is None and a.apply_router_weight_on_input is False
    with pytest.raises(TypeError):
        fn(x, x, x, x, 1, *([None] * 14), False)  # keyword-only stays keyword-only


# ----------------------------------------------------------------------------------------------- autograd
class _Ctx:
    def __init__(self, needs):
        self.needs_input_grad = needs


def test_gradients_are_returned_by_name():
    sig = F.FUSED_MOE
    assert sig.grads({"router_logits": 1, "w2_bias": 2}) == (None, 1) + (None,) * 14 + (2, None, None)
    with pytest.raises(AssertionError, match="no positional argument"):
        sig.grads({"topk_weights": 1})  # fused_moe has none: the gradient goes to router_logits
    needs = sig.needs_input_grad(_Ctx((True, False, True)))  # trailing defaults dropped by the dispatcher
    assert len(needs) == 19 and needs["hidden_states"] and needs["w13"] and not needs["w2_bias"]


# ----------------------------------------------------------------------------------------------- scheme names
@pytest.mark.parametrize("quant_config", ["fp8_tensor", "fp8_block", "int8", "int4", "int4_group", "int4_w4a16"])
def test_the_layer_passes_its_canonical_scheme_name(monkeypatch, quant_config):
    """The op schema takes a string; the layer passes the scheme's canonical name, which the op decodes with
    one dict lookup (no alias, no re-parsing)."""
    E, K, H, I = 4, 2, 128, 128  # int4: K divisible by the group size 128
    layer = FusedMoE(E, K, H, I, quant_config=quant_config)
    scheme = layer.quant_config.quant_scheme
    assert layer.quant_scheme == scheme.name and QUANT_SCHEMES[layer.quant_scheme] is scheme
    w13, w2, _, _ = random_moe_weights(E, H, I)
    layer.load_weights(w13, w2)
    names = []
    real = F.get_quant_scheme
    monkeypatch.setattr(F, "get_quant_scheme", lambda name: names.append(name) or real(name))
    with torch.no_grad():
        layer(torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, E))
    assert names and set(names) == {scheme.name}
    assert get_quant_scheme(scheme.name) is scheme
