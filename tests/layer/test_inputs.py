"""FusedMoE's input rules (``layer/inputs.py``, docs/design.md §10.2): any leading dims (also under torch.compile,
one graph across batch and sequence), empty and single-token batches, wrong shapes and dtypes raise naming the
argument and the layer (eagerly and compiled), and the activation-dtype check of unquantized and quantized layers."""
import pytest
import torch
import torch._dynamo.testing
from torch import nn

from torch_moe_ops import Fp8Config
from torch_moe_ops.layer.inputs import ACTIVATION_DTYPES, INDEX_DTYPES
from torch_moe_ops.testing import sqnr_db

from ._layer import CONFIGS, NAME, QUANT, E, H, K, _loaded, _x


# ------------------------------------------------------------------------------------ 1. leading dims
@pytest.mark.parametrize("scheme", list(CONFIGS))
@pytest.mark.parametrize("lead", [(3, 5), (2, 3, 5), (1, 1)])
def test_any_leading_dims_equal_the_flat_call(scheme, lead):
    layer = _loaded(CONFIGS[scheme], has_bias=True)
    x, logits = _x(*lead)
    out = layer(x, logits)
    assert out.shape == x.shape and out.dtype == x.dtype
    flat = layer(x.reshape(-1, H), logits.reshape(-1, E))
    torch.testing.assert_close(out, flat.reshape(x.shape), atol=0, rtol=0)
    weights, ids = layer.select_experts(logits)
    assert weights.shape == ids.shape == (*lead, K)
    torch.testing.assert_close(layer.forward_experts(x, weights, ids), out, atol=0, rtol=0)


def test_shared_experts_input_keeps_its_leading_dims():
    shared = nn.Linear(H, H, bias=False, dtype=torch.bfloat16)
    layer = _loaded(shared_experts=shared)
    x, logits = _x(3, 5)
    other = torch.randn(3, 5, H, dtype=torch.bfloat16)
    out = layer(x, logits, other)
    layer.shared_experts = None
    torch.testing.assert_close(out, layer(x, logits) + shared(other), atol=0, rtol=0)
    layer.shared_experts = shared
    with pytest.raises(ValueError, match=f"{NAME}: shared_experts_input must be .*leading dims of hidden_states"):
        layer(x, logits, other[:2])


@pytest.mark.parametrize("call, match", [
    (lambda l, x, g: l(x, g[:2]), "router_logits must be .*leading dims of hidden_states \\[3, 5, 96\\], got shape \\[2, 5, 5\\]"),
    (lambda l, x, g: l(x, g.reshape(15, E)), "router_logits must be"),
    (lambda l, x, g: l(x, g[..., :4]), "router_logits must be \\[..., E=5\\]"),
    (lambda l, x, g: l(x[..., :95], g), "hidden_states must be \\[..., H=96\\], got shape \\[3, 5, 95\\]"),
    (lambda l, x, g: l(x[0, 0], g[0, 0]), "hidden_states must be .*at least one leading"),
    (lambda l, x, g: l.forward_experts(x, *l.select_experts(g.reshape(15, E))), "topk_weights must be"),
    (lambda l, x, g: l.forward_experts(x, l.select_experts(g)[0], l.select_experts(g)[1][..., :1]),
     "topk_ids must be \\[..., k=2"),
])
def test_bad_shapes_name_the_argument_and_the_layer(call, match):
    layer = _loaded()
    x, logits = _x(3, 5)
    with pytest.raises(ValueError, match=f"{NAME}: {match}"):
        call(layer, x, logits)


@pytest.mark.parametrize("scheme", ["none", "fp8_block"])
def test_leading_dims_compile_once_across_batch_and_sequence(scheme):
    layer = _loaded(CONFIGS[scheme])
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            for B, S in ((2, 3), (3, 11), (4, 6), (9, 2), (6, 6)):  # none equal to H, E or 1
                x, logits = _x(B, S)
                torch.testing.assert_close(compiled(x, logits), layer(x, logits), atol=0, rtol=0)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------ 2. activation dtype
@pytest.mark.parametrize("params_dtype, x_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
                                                   (torch.float32, torch.bfloat16)])
def test_unquantized_dtype_mismatch_names_the_activation(params_dtype, x_dtype):
    layer = _loaded(dtype=params_dtype)
    x, logits = _x(3, 5, dtype=x_dtype)
    match = (f"{NAME}: hidden_states has dtype {x_dtype} but the layer computes in params_dtype {params_dtype}: "
             f"cast the input .* or build the layer with params_dtype={x_dtype}")
    with pytest.raises(TypeError, match=match):
        layer(x, logits)
    with pytest.raises(TypeError, match=match):
        layer.forward_experts(x, *layer.select_experts(logits))


@pytest.mark.parametrize("scheme", QUANT)
def test_quantized_layers_take_every_activation_dtype_the_op_takes(scheme):
    layer = _loaded(CONFIGS[scheme], has_bias=True)  # bf16 biases
    x, logits = _x(3, 5, dtype=torch.float32)
    ref = layer(x.bfloat16(), logits).float()
    for dtype in (torch.float16, torch.float32):
        out = layer(x.to(dtype), logits)
        assert out.dtype == dtype and out.shape == x.shape
        assert sqnr_db(ref, out.float()) > 30
    with pytest.raises(TypeError, match=f"{NAME}: hidden_states has dtype torch.float64; a quantized layer"):
        layer(x.double(), logits)


# ------------------------------------------------------------------------------------ 3. bad inputs
@pytest.mark.parametrize("call, exc, match", [
    (lambda l, x, g: l(x, g[:, :-1]), ValueError, r"router_logits must be \[\.\.\., E=5\].*got shape \[3, 4\]"),
    (lambda l, x, g: l(x, torch.randn(4, E)), ValueError,
     r"router_logits .*leading dims.*\[3, 96\], got shape \[4, 5\]"),
    (lambda l, x, g: l(x[0], g[0]), ValueError, r"hidden_states must be \[\.\.\., H=96\] with at least one leading"),
    (lambda l, x, g: l(x, g.long()), TypeError, r"router_logits must have dtype in \(bfloat16, float16, float32\)"),
    (lambda l, x, g: l.forward_experts(x, *l.select_experts(g)[:1], l.select_experts(g)[1].short()), TypeError,
     r"topk_ids must have dtype in \(int32, int64\), got torch.int16"),
    (lambda l, x, g: l.forward_experts(x, l.select_experts(g)[0].long(), l.select_experts(g)[1]), TypeError,
     r"topk_weights must have dtype in"),
])
def test_bad_inputs_name_the_argument_and_the_layer(call, exc, match):
    layer = _loaded()
    x, g = _x(3)
    with pytest.raises(exc, match=f"^{NAME}: .*{match}"):
        call(layer, x, g)


@pytest.mark.parametrize("lead", [(0,), (1,), (2, 0), (1, 1)])
def test_empty_and_single_token_batches(lead):
    layer = _loaded(Fp8Config("channel"))
    x, g = _x(*lead)
    out = layer(x, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    if out.numel():
        torch.testing.assert_close(out, layer(x.reshape(-1, H), g.reshape(-1, E)).reshape(x.shape), atol=0, rtol=0)


def test_router_logits_dtype_is_free_and_int64_ids_equal_int32():
    layer = _loaded(dtype=torch.float32)
    x, g = _x(7, dtype=torch.float32)
    out = layer(x, g)
    torch.testing.assert_close(layer(x, g.bfloat16()), layer(x, g.bfloat16().float()), atol=0, rtol=0)
    weights, ids = layer.select_experts(g)
    assert ids.dtype == torch.int32
    torch.testing.assert_close(layer.forward_experts(x, weights, ids.long()), out, atol=0, rtol=0)


def test_compiled_wrong_shapes_still_raise():
    layer = _loaded()
    f = torch.compile(layer, fullgraph=True, dynamic=True, backend="eager")
    x, g = _x(3)
    torch.testing.assert_close(f(x, g), layer(x, g), atol=0, rtol=0)
    x7, g7 = _x(7)
    torch.testing.assert_close(f(x7, g7), layer(x7, g7), atol=0, rtol=0)
    for bad in ((x7, g7[:6]), (x7, torch.randn(7, E + 1)), (torch.randn(7, H + 1, dtype=torch.bfloat16), g7),
                (x7.reshape(7, 1, H), g7.reshape(1, 7, E))):
        with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
            f(*bad)
    fe = torch.compile(layer.forward_experts, fullgraph=True, dynamic=True, backend="eager")
    w, ids = layer.select_experts(torch.randn(9, E))
    fe(torch.randn(9, H, dtype=torch.bfloat16), w, ids)
    with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
        fe(torch.randn(8, H, dtype=torch.bfloat16), w, ids)
    with pytest.raises(Exception, match="FusedMoE: hidden_states must be"):
        fe(torch.randn(9, H, dtype=torch.bfloat16), w, ids[:, :1])


# ------------------------------------------------------------------------------------ 4. the eager shortcut
@pytest.mark.parametrize("quant", [None, Fp8Config("channel")], ids=["bf16", "fp8"])
def test_eager_calls_skip_the_checks_only_when_they_would_pass(monkeypatch, quant):
    """``FusedMoE._inputs_pass`` decides in ~1 µs what the checks (~13 µs) would: a valid call runs none of them,
    and every input the checks refuse is sent through them (the messages above come from there). Unquantized
    layers take their own dtype only; quantized ones bf16, fp16, fp32."""
    layer = _loaded(quant)
    x, g = _x(2, 3)
    ran = []
    monkeypatch.setattr(layer, "_check_input", lambda h: ran.append(h))
    layer(x, g)
    assert ran == [], "a valid call ran the checks"
    logits = lambda r: (r, E, ACTIVATION_DTYPES)  # noqa: E731
    assert layer._inputs_pass(x.float(), logits(g)) is (quant is not None) and layer._inputs_pass(x, logits(g.float()))
    bad = [(x[0, 0], g[0, 0]), (x, g[..., :-1]), (x[..., :-1], g), (x, g[:1]), (x[None], g), (x, g.long()),
           (x.double(), g), (x.tolist(), g), (x, None)]
    for h, r in bad:
        assert not layer._inputs_pass(h, logits(r)), (getattr(h, "shape", h), getattr(r, "shape", r))
    tw, ids = layer.select_experts(g)  # forward_experts: the same, with topk_weights [..., k] and topk_ids
    layer.forward_experts(x, tw, ids)
    assert ran == [], "a valid forward_experts call ran the checks"
    args = lambda w, i: ((w, w.shape[-1], ACTIVATION_DTYPES), (i, w.shape[-1], INDEX_DTYPES))  # noqa: E731
    assert layer._inputs_pass(x, *args(tw, ids)) and layer._inputs_pass(x, *args(tw, ids.long()))
    for w, i in [(tw, ids[..., :-1]), (tw[:1], ids[:1]), (tw.long(), ids), (tw, ids.float()), (tw, ids.short())]:
        assert not layer._inputs_pass(x, *args(w, i)), (w.shape, w.dtype, i.shape, i.dtype)
    layer.reset_parameters()  # a fresh load: forward refuses until the weights are loaded again
    assert not layer._inputs_pass(x, (g, E, ACTIVATION_DTYPES))
