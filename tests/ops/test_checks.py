"""Bad arguments raise a clear Python error naming the argument, before any kernel runs; the fake (meta) path
raises the same shape/dtype errors. Non-finite router logits are *not* errors: they must give valid ids and
finite weights (docs/design.md §4.1)."""
import math

import pytest
import torch

import torch_moe_ops
from torch_moe_ops import reference

E, H, I, T, K = 8, 72, 40, 5, 2


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Any call into the CPU kernels (the references) fails the test: errors must come from the checks."""
    for name in ("topk_route", "align_block_size", "fused_experts", "act_and_mul", "moe_sum", "quantize_weight",
                 "quantize_activation"):
        def ran(*a, _name=name, **k):
            raise AssertionError(f"the {_name} kernel ran on bad input")
        monkeypatch.setattr(reference, name, ran)


def good(**over):
    """Valid positional arguments of moe::fused_experts, with ``over`` replacing some."""
    a = dict(hidden_states=torch.randn(T, H), w13=torch.randn(E, 2 * I, H), w2=torch.randn(E, H, I),
             topk_weights=torch.rand(T, K), topk_ids=torch.randint(0, E, (T, K), dtype=torch.int32),
             activation="silu", quant_scheme="none", w13_scale=None, w2_scale=None, w13_bias=None, w2_bias=None,
             block_shape=None, expert_map=None)
    a.update(over)
    return a


def fp8(*shape):
    return torch.randn(*shape).to(torch.float8_e4m3fn)


def call(args, device="cpu"):
    def conv(t):
        if not isinstance(t, torch.Tensor) or device == "cpu":
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    args = {k: conv(v) for k, v in args.items()}
    return torch.ops.moe.fused_experts(*args.values())


FP8_CH = dict(quant_scheme="fp8_channel", w13=fp8(E, 2 * I, H), w2=fp8(E, H, I))
BAD_EXPERTS = [  # (arguments, exception, regex naming the argument)
    pytest.param(good(hidden_states=torch.randint(0, 9, (T, H))), TypeError, "hidden_states", id="int-hidden"),
    pytest.param(good(hidden_states=torch.randn(T, H, 1)), ValueError, "hidden_states", id="3d-hidden"),
    pytest.param(good(hidden_states=torch.randn(H, T).t()), ValueError, "hidden_states.*contiguous last dim",
                 id="last-dim-strided-hidden"),
    pytest.param(good(w13=torch.randn(2 * I, H)), ValueError, "w13", id="2d-w13"),
    pytest.param(good(w2=torch.randn(E, H, I).bfloat16()), TypeError, "w2", id="w2-dtype-differs"),
    pytest.param(good(w13=fp8(E, 2 * I, H), w2=fp8(E, H, I)), TypeError, "w13", id="fp8-weights-with-none"),
    pytest.param(good(topk_ids=torch.rand(T, K)), TypeError, "topk_ids", id="float-topk_ids"),
    pytest.param(good(topk_weights=torch.rand(T, K).to(torch.int32)), TypeError, "topk_weights", id="int-weights"),
    pytest.param(good(topk_ids=torch.randint(0, E, (K, T), dtype=torch.int32).t()), ValueError,
                 "topk_ids.*contiguous", id="non-contiguous-topk_ids"),
    pytest.param(good(topk_ids=torch.randint(0, E, (T + 1, K), dtype=torch.int32)), ValueError, "topk_ids",
                 id="topk_ids-T-mismatch"),
    pytest.param(good(topk_weights=torch.rand(T, K + 1)), ValueError, "topk_(ids|weights)", id="k-mismatch"),
    pytest.param(good(w13=torch.randn(E, 2 * I, H + 1)), ValueError, "w13", id="H-mismatch-w13"),
    pytest.param(good(w2=torch.randn(E + 1, H, I)), ValueError, "w2", id="E-mismatch-w2"),
    pytest.param(good(w2=torch.randn(E, H + 8, I)), ValueError, "w2", id="H-mismatch-w2"),
    pytest.param(good(w2=torch.randn(E, H, I + 8)), ValueError, "w13.*I=", id="I-mismatch"),
    pytest.param(good(activation="silu_no_mul"), ValueError, "w13.*non-gated", id="gated-w13-with-no_mul"),
    pytest.param(good(w13=torch.randn(E, I, H)), ValueError, "w13.*gated", id="no_mul-w13-with-silu"),
    pytest.param(good(w13_bias=torch.randn(E, I)), ValueError, "w13_bias", id="w13_bias-shape"),
    pytest.param(good(w2_bias=torch.randn(E, H + 1)), ValueError, "w2_bias", id="w2_bias-shape"),
    pytest.param(good(activation="relu2"), ValueError, "relu2_no_mul", id="gated-relu2"),
    pytest.param(good(activation="swish"), ValueError, "activation", id="unknown-activation"),
    pytest.param(good(quant_scheme="fp4"), ValueError, "quant_scheme", id="unknown-scheme"),
    pytest.param(good(w13_scale=torch.ones(E, 2), w2_scale=torch.ones(E)), ValueError, "w13_scale",
                 id="scales-for-none"),
    pytest.param(good(block_shape=[128, 128]), ValueError, "block_shape", id="block_shape-for-none"),
    pytest.param(good(**FP8_CH, block_shape=[128, 128], w13_scale=torch.ones(E, 2 * I), w2_scale=torch.ones(E, H)),
                 ValueError, "block_shape", id="block_shape-for-fp8_channel"),
    pytest.param(good(**FP8_CH), ValueError, "w13_scale", id="missing-scales"),
    pytest.param(good(**FP8_CH, w13_scale=torch.ones(E, 2 * I)), ValueError, "w2_scale", id="missing-w2_scale"),
    pytest.param(good(**FP8_CH, w13_scale=torch.ones(E, 2 * I), w2_scale=torch.ones(E, I)), ValueError, "w2_scale",
                 id="wrong-shape-w2_scale"),
    pytest.param(good(**FP8_CH, w13_scale=torch.ones(E, 2 * I, dtype=torch.float64), w2_scale=torch.ones(E, H)),
                 TypeError, "w13_scale", id="fp64-w13_scale"),
    pytest.param(good(quant_scheme="fp8_tensor", w13=fp8(E, 2 * I, H), w2=fp8(E, H, I), w13_scale=torch.ones(E, 3),
                      w2_scale=torch.ones(E)), ValueError, "w13_scale", id="fp8_tensor-w13_scale-3-cols"),
    pytest.param(good(quant_scheme="fp8_block", w13=fp8(E, 2 * I, H), w2=fp8(E, H, I), w13_scale=torch.ones(E, 1, 1),
                      w2_scale=torch.ones(E, 1, 1), block_shape=[32, 32]), ValueError, "w13_scale",
                 id="fp8_block-scale-vs-block_shape"),
    pytest.param(good(quant_scheme="int8_w8a16", w13=fp8(E, 2 * I, H), w2=fp8(E, H, I),
                      w13_scale=torch.ones(E, 2 * I), w2_scale=torch.ones(E, H)), TypeError, "w13",
                 id="int8-scheme-with-fp8-weights"),
    pytest.param(good(expert_map=torch.arange(E, dtype=torch.int64)), TypeError, "expert_map", id="int64-expert_map"),
]


@pytest.mark.parametrize("args,exc,match", BAD_EXPERTS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fused_experts_bad_input(args, exc, match, device):
    with pytest.raises(exc, match=match):
        call(args, device)


@pytest.mark.parametrize("args,match", [
    pytest.param(good(topk_ids=torch.full((T, K), E, dtype=torch.int32)), "topk_ids", id="id-eq-E"),
    pytest.param(good(topk_ids=torch.full((T, K), -1, dtype=torch.int32)), "topk_ids", id="id-negative"),
    pytest.param(good(expert_map=torch.full((E,), E, dtype=torch.int32)), "expert_map", id="map-value-too-big"),
    pytest.param(good(expert_map=torch.full((E,), -2, dtype=torch.int32)), "expert_map", id="map-value-below-1"),
    pytest.param(good(topk_ids=torch.full((T, K), 2 * E, dtype=torch.int32),
                      expert_map=torch.arange(E, dtype=torch.int32)), "topk_ids", id="id-beyond-expert_map"),
])
def test_fused_experts_values_out_of_range(args, match):
    """Value checks run on CPU (on CUDA only in debug mode, to avoid a host sync)."""
    with pytest.raises(ValueError, match=match):
        call(args)


def test_values_unchecked_on_meta():
    """Meta/fake tensors have no values: the shape checks pass and the out-of-range id goes unnoticed."""
    out = call(good(topk_ids=torch.full((T, K), 99, dtype=torch.int32)), "meta")
    assert out.device.type == "meta" and out.shape == (T, H)


LOGITS = torch.randn(T, E)
BAD_ROUTE = [  # kwargs of torch.ops.moe.topk_route
    pytest.param(dict(router_logits=LOGITS, top_k=E + 1), ValueError, "top_k", id="top_k-gt-E"),
    pytest.param(dict(router_logits=LOGITS, top_k=0), ValueError, "top_k", id="top_k-0"),
    pytest.param(dict(router_logits=LOGITS.long(), top_k=2), TypeError, "router_logits", id="int-logits"),
    pytest.param(dict(router_logits=torch.randn(E), top_k=2), ValueError, "router_logits", id="1d-logits"),
    pytest.param(dict(router_logits=torch.randn(E, T).t(), top_k=2), ValueError, "router_logits",
                 id="strided-logits"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, scoring_func="softplus"), ValueError, "scoring_func",
                 id="unknown-scoring"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, num_expert_group=3, topk_group=1), ValueError,
                 "num_expert_group", id="E-mod-G"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, num_expert_group=4, topk_group=5), ValueError, "topk_group",
                 id="kG-gt-G"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, num_expert_group=4, topk_group=0), ValueError, "topk_group",
                 id="kG-0"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, num_expert_group=8, topk_group=1), ValueError,
                 "num_expert_group", id="G-eq-E"),
    pytest.param(dict(router_logits=LOGITS, top_k=5, num_expert_group=4, topk_group=2), ValueError, "top_k",
                 id="k-gt-kept-experts"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, e_score_correction_bias=torch.zeros(E + 1)), ValueError,
                 "e_score_correction_bias", id="bias-shape"),
    pytest.param(dict(router_logits=LOGITS, top_k=2, e_score_correction_bias=torch.zeros(2 * E)[::2]), ValueError,
                 "e_score_correction_bias", id="bias-strided"),
]


@pytest.mark.parametrize("kw,exc,match", BAD_ROUTE)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_topk_route_bad_input(kw, exc, match, device):
    if device == "meta":
        kw = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor)
              else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        torch.ops.moe.topk_route(**kw)


def _moe_args(**over):
    a = good()
    a = dict(hidden_states=a["hidden_states"], router_logits=torch.randn(T, E), w13=a["w13"], w2=a["w2"], top_k=K)
    a.update(over)
    return a


@pytest.mark.parametrize("kw,match", [
    pytest.param(_moe_args(router_logits=torch.randn(T + 1, E)), "router_logits", id="logits-T"),
    pytest.param(_moe_args(router_logits=torch.randn(T, E + 1)), "router_logits", id="logits-E-vs-w13"),
    pytest.param(_moe_args(router_logits=torch.randn(T, E), expert_map=torch.zeros(2 * E, dtype=torch.int32)),
                 "router_logits", id="logits-E-vs-expert_map"),
    pytest.param(_moe_args(top_k=E + 1), "top_k", id="top_k-gt-E"),
    pytest.param(_moe_args(activation="relu2"), "relu2_no_mul", id="relu2"),
    pytest.param(_moe_args(quant_scheme="fp8_channel", w13=fp8(E, 2 * I, H), w2=fp8(E, H, I)), "w13_scale",
                 id="missing-scales"),
    pytest.param(_moe_args(w2=torch.randn(E, H, I + 1)), "w13", id="I-mismatch"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fused_moe_bad_input(kw, match, device):
    if device == "meta":
        kw = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        torch.ops.moe.fused_moe(**kw)


def test_fused_moe_expert_map_values_out_of_range():
    """fused_moe checks expert_map's values itself (its routed ids are in range by construction)."""
    bad_map = torch.full((E,), E, dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_map"):
        torch.ops.moe.fused_moe(**_moe_args(expert_map=bad_map))


BAD_OTHER = [  # (op name, kwargs, exception, regex)
    pytest.param("align_block_size", dict(topk_ids=torch.rand(T, K), num_experts=E, block_size=16), TypeError,
                 "topk_ids", id="align-float-ids"),
    pytest.param("align_block_size", dict(topk_ids=torch.zeros(K, T, dtype=torch.int32).t(), num_experts=E,
                                          block_size=16), ValueError, "topk_ids", id="align-non-contiguous"),
    pytest.param("align_block_size", dict(topk_ids=torch.zeros(T, K, dtype=torch.int32), num_experts=E,
                                          block_size=0), ValueError, "block_size", id="align-block-0"),
    pytest.param("align_block_size", dict(topk_ids=torch.zeros(T, K, dtype=torch.int32), num_experts=E,
                                          block_size=16, expert_map=torch.zeros(E - 1, dtype=torch.int32)),
                 ValueError, "expert_map", id="align-map-length"),
    pytest.param("act_and_mul", dict(x=torch.randn(T, 41)), ValueError, "x", id="act-odd-gated"),
    pytest.param("act_and_mul", dict(x=torch.randn(T, 40), activation="relu2"), ValueError, "relu2_no_mul",
                 id="act-relu2"),
    pytest.param("act_and_mul", dict(x=torch.randn(T, 40), activation="tanh"), ValueError, "activation",
                 id="act-unknown"),
    pytest.param("act_and_mul", dict(x=torch.randn(T, 40), limit=-1.0), ValueError, "limit", id="act-neg-limit"),
    pytest.param("act_and_mul", dict(x=torch.randn(40)), ValueError, "x", id="act-1d"),
    pytest.param("act_and_mul", dict(x=torch.randint(0, 3, (T, 40))), TypeError, "x", id="act-int"),
    pytest.param("moe_sum", dict(x=torch.randn(T, H)), ValueError, "x", id="sum-2d"),
    pytest.param("quantize_weight", dict(w=torch.randn(E, H, I), scheme="fp4"), ValueError, "scheme",
                 id="qw-unknown-scheme"),
    pytest.param("quantize_weight", dict(w=torch.randn(H), scheme="fp8_channel"), ValueError, "w", id="qw-1d"),
    pytest.param("quantize_weight", dict(w=torch.randn(E, H, I), scheme="fp8_channel", block_shape=[32, 32]),
                 ValueError, "block_shape", id="qw-block_shape-for-channel"),
    pytest.param("quantize_weight", dict(w=torch.randn(E, H, I), scheme="fp8_block", block_shape=[0, 32]),
                 ValueError, "block_shape", id="qw-block_shape-0"),
    pytest.param("quantize_weight", dict(w=torch.randn(E, 7, I), scheme="fp8_tensor", shards=2), ValueError,
                 "shards", id="qw-shards-not-dividing"),
    pytest.param("quantize_weight", dict(w=torch.randn(E, H, I), scheme="fp8_channel", shards=2), ValueError,
                 "shards", id="qw-shards-for-channel"),
    pytest.param("quantize_weight_into", dict(w=torch.randn(E, H, I), qweight=torch.empty(E, H, I, dtype=torch.int8),
                                              scale=torch.empty(E, H), scheme="fp8_channel"), TypeError, "qweight",
                 id="qwi-int8-for-fp8"),
    pytest.param("quantize_weight_into", dict(w=torch.randn(E, H, I), qweight=fp8(E, H, I), scale=torch.empty(E, I),
                                              scheme="fp8_channel"), ValueError, "scale", id="qwi-scale-shape"),
    pytest.param("quantize_weight_into", dict(w=torch.randn(E, H, I), qweight=fp8(E, H, I + 1),
                                              scale=torch.empty(E, H), scheme="fp8_channel"), ValueError, "qweight",
                 id="qwi-qweight-shape"),
    pytest.param("quantize_activation", dict(x=torch.randn(T, K, H), scheme="fp8_token"), ValueError, "x",
                 id="qa-3d"),
    pytest.param("quantize_activation", dict(x=torch.randn(T, H), scheme="fp8_tensor"), ValueError, "scheme",
                 id="qa-unknown-scheme"),
    pytest.param("quantize_activation", dict(x=torch.randn(T, H), scheme="fp8_group", group_size=0), ValueError,
                 "group_size", id="qa-group-0"),
]


@pytest.mark.parametrize("op,kw,exc,match", BAD_OTHER)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_other_ops_bad_input(op, kw, exc, match, device):
    if device == "meta":
        kw = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor)
              else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        getattr(torch.ops.moe, op)(**kw)


def test_align_ids_out_of_range():
    with pytest.raises(ValueError, match="topk_ids"):
        torch_moe_ops.align_block_size(torch.full((T, K), E, dtype=torch.int32), E, 16)


# ----------------------------------------------------------------------------- non-finite logits (not errors)

@pytest.fixture
def real_kernels(monkeypatch):
    monkeypatch.undo()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_logits_give_valid_routes(real_kernels, scoring, grouped, dtype):
    E_, k = 16, 4
    logits = torch.randn(6, E_)
    logits[0, 3] = math.nan
    logits[1, :] = math.nan  # all NaN: every weight 0
    logits[2, [1, 9]] = math.inf
    logits[3, :] = -math.inf
    logits[4, [0, 5]] = math.nan
    logits[4, [2, 7]] = math.inf
    logits[5, ::2] = -math.inf
    kw = dict(num_expert_group=4, topk_group=2, e_score_correction_bias=torch.randn(E_) * 0.1) if grouped else {}
    w, ids = torch_moe_ops.topk_route(logits.to(dtype), k, scoring_func=scoring, **kw)
    assert ((ids >= 0) & (ids < E_)).all()
    assert all(len(set(r)) == k for r in ids.tolist()), "ids within a token stay distinct"
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[1] == 0).all(), "an all-NaN row routes with zero weight"
    if not grouped:
        assert 3 not in ids[0].tolist(), "NaN ranks last"
        assert {1, 9} <= set(ids[2].tolist()) and {2, 7} <= set(ids[4].tolist()), "+Inf ranks first"
    if scoring == "softmax" and not grouped:
        torch.testing.assert_close(w[2, :2], torch.full((2,), 0.5))
    # and the whole layer stays finite
    x = torch.randn(6, H) / 10
    w13, w2 = torch.randn(E_, 2 * I, H) / 10, torch.randn(E_, H, I) / 10
    out = torch_moe_ops.fused_moe(x, logits.to(dtype), w13, w2, k, scoring_func=scoring, **kw)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
