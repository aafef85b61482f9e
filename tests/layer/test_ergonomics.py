"""FusedMoE ergonomics (docs/design.md §10.2, §10.3): any leading dims, the activation-dtype check and vLLM's
weight_loader convention (meta devices and dtype casts: test_ergonomics_apply.py)."""
import pytest
import torch
import torch._dynamo.testing
from torch import nn

from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, Int8Config
from torch_moe_ops.checkpoint import finalize_loading
from torch_moe_ops.testing import random_moe_weights, sqnr_db

E, K, H, I = 5, 2, 96, 32  # E odd, H not a power of two, H != I (no square experts); int4 groups of 32
CONFIGS = {"none": None, "fp8_tensor": Fp8Config("tensor"), "fp8_channel": Fp8Config("channel"),
           "fp8_block": Fp8Config("block", block_shape=(32, 32)), "int8": Int8Config(), "int4": Int4Config(32)}
QUANT = [n for n in CONFIGS if n != "none"]
NAME = "model.layers.3.mlp.experts"


def _loaded(qc=None, *, dtype=torch.bfloat16, **kw):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=dtype, **kw)
    layer.layer_name = NAME
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=layer.has_bias)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2,
                       e_score_correction_bias=torch.rand(E) if layer.use_correction_bias else None)
    return layer


def _x(*lead, dtype=torch.bfloat16):
    return torch.randn(*lead, H, dtype=dtype) / 2, torch.randn(*lead, E)


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


# ------------------------------------------------------------------------------------ 3. vLLM's weight_loader
def _ckpt(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(I, H, generator=g) / 10, torch.randn(I, H, generator=g) / 10,
             torch.randn(H, I, generator=g) / 10) for _ in range(E)]


def _load_each(layer, call, seed=0):
    for e, (w1, w3, w2) in enumerate(_ckpt(seed)):
        for shard, hf, w in (("w1", "gate_proj", w1), ("w3", "up_proj", w3), ("w2", "down_proj", w2)):
            param = layer.w2_weight if shard == "w2" else layer.w13_weight
            call(param, w, f"model.layers.0.mlp.experts.{e}.{hf}.weight", shard, e)
    finalize_loading(layer)
    return layer


CALLS = {  # the call shapes of vLLM model code (Mixtral / Qwen2-MoE / DeepSeek load_weights) and ours
    "vllm_keywords": lambda p, w, n, s, e: p.weight_loader(p, w, n, shard_id=s, expert_id=e),
    "vllm_return_success": lambda p, w, n, s, e: _true(p.weight_loader(p, w, n, shard_id=s, expert_id=e,
                                                                       return_success=True)),
    "vllm_positional": lambda p, w, n, s, e: p.weight_loader(p, w, n, s, e),
    "vllm_positional_success": lambda p, w, n, s, e: _true(p.weight_loader(p, w, n, s, e, True)),
    "ours_positional": lambda p, w, n, s, e: p.weight_loader(p, w, s, e),
    "ours_keywords": lambda p, w, n, s, e: p.weight_loader(p, w, shard_id=s, expert_id=e, weight_name=n),
}


def _true(result):
    assert result is True


@pytest.mark.parametrize("scheme", ["none", "fp8_block", "int4"])
@pytest.mark.parametrize("convention", list(CALLS))
def test_weight_loader_calling_conventions_load_the_same_bytes(scheme, convention):
    qc = CONFIGS[scheme]
    ref = _load_each(FusedMoE(E, K, H, I, quant_config=qc), lambda p, w, n, s, e: p.weight_loader(p, w, s, e))
    layer = _load_each(FusedMoE(E, K, H, I, quant_config=qc), CALLS[convention])
    assert layer.is_loaded
    for a, b in zip(ref.parameters(), layer.parameters()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_weight_loader_convention_errors():
    layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("channel"))
    layer.layer_name = NAME
    w2 = torch.randn(H, I)
    with pytest.raises(TypeError, match=f"{NAME}: weight_loader's third argument must be a shard id .* got int"):
        layer.weight_loader(layer.w2_weight, w2, 3, 0)
    with pytest.raises(TypeError, match="shard_id twice"):
        layer.weight_loader(layer.w2_weight, w2, "w2", 0, shard_id="w2")
    with pytest.raises(TypeError, match="expert_id twice"):
        layer.weight_loader(layer.w2_weight, w2, "x.down_proj.weight", "w2", 0, expert_id=0)
    with pytest.raises(TypeError, match="weight_name twice"):
        layer.weight_loader(layer.w2_weight, w2, "x.down_proj.weight", weight_name="y", shard_id="w2", expert_id=0)
    with pytest.raises(TypeError, match="at most 2 positional arguments"):
        layer.weight_loader(layer.w2_weight, w2, "w2", 0, True)
    with pytest.raises(ValueError, match="expected shape .* \\(checkpoint tensor 'x.experts.0.down_proj.weight'\\)"):
        layer.weight_loader(layer.w2_weight, w2[:, :-1], "x.experts.0.down_proj.weight", shard_id="w2", expert_id=0)
    assert layer.load_state == "fresh"  # nothing of the failed calls was recorded
    # "w13" is a shard id: a fused gate_up, positionally in our convention
    w13, _, _, _ = random_moe_weights(E, H, I, dtype=torch.float32)
    layer.weight_loader(layer.w13_weight, w13[0], "w13", 0)
    assert layer.missing_weights()[0] == ("w2_weight", 0, "w2")
