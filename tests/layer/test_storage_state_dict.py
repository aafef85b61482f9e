"""FusedMoE's tensors copied and converted (``layer/storage.py``, docs/design.md §10.1): deepcopy, load_state_dict
(also assign=True into a meta-built layer, another dtype, another storage format), meta and to_empty round trips,
half() of quantized layers, refused casts."""
import copy

import pytest
import torch

from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, Int8Config, LoadError
from torch_moe_ops.testing import random_moe_weights

E, K, H, I = 5, 2, 96, 32
CONFIGS = {"none": None, "fp8_block": Fp8Config("block", block_shape=(32, 32)), "int4": Int4Config(32)}


def _loaded(qc=None, seed=0, dtype=torch.bfloat16, **kw):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=dtype, has_bias=True, **kw)
    w13, w2, b13, b2 = _weights(seed)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)
    return layer


def _weights(seed):
    return random_moe_weights(E, H, I, bias=True, generator=torch.Generator().manual_seed(seed))


def _x(T=7, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(T, H, generator=g) / 2).to(dtype), torch.randn(T, E, generator=g)


def _bytes(layer):
    return {n: p.detach().clone() for n, p in layer.named_parameters()}


def _same(a: dict, b: dict):
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(
        a[n].view(torch.uint8) if a[n].element_size() == 1 else a[n], b[n].view(torch.uint8)
        if b[n].element_size() == 1 else b[n]) for n in a)


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_deepcopy_is_a_separate_layer_with_its_own_weight_loaders(scheme):
    layer = _loaded(CONFIGS[scheme])
    twin = copy.deepcopy(layer)
    x, g = _x()
    assert torch.equal(twin(x, g), layer(x, g)) and twin.loader is not layer.loader
    for name in ("w13_weight", "w2_weight", "w13_bias"):  # vLLM-style loaders call param.weight_loader
        assert getattr(twin, name).weight_loader.__self__ is twin
    w13, w2, b13, b2 = _weights(5)
    before = _bytes(layer)
    for e in range(E):
        twin.w13_weight.weight_loader(twin.w13_weight, w13[e], "w13", e)
        twin.w2_weight.weight_loader(twin.w2_weight, w2[e], "w2", e)
        twin.w13_bias.weight_loader(twin.w13_bias, b13[e], "w13", e)
        twin.w2_bias.weight_loader(twin.w2_bias, b2[e], "w2", e)
    assert twin.load_rounds == 2 and _same(_bytes(layer), before)  # the original is untouched


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_state_dict_assigned_into_a_meta_layer(scheme):
    qc = CONFIGS[scheme]
    src = _loaded(qc)
    with torch.device("meta"):
        dst = FusedMoE(E, K, H, I, quant_config=qc, has_bias=True)
    dst.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)
    assert dst.load_state == "loaded" and not dst.w13_weight.is_meta
    x, g = _x()
    assert torch.equal(dst(x, g), src(x, g))
    for name in ("w13_weight", "w2_weight", "w13_bias", "w2_bias"):
        assert getattr(dst, name).weight_loader.__self__ is dst
    if qc is None:
        assert dst.full_precision["w13_weight"] is dst.w13_weight
    # Parameters shared with another layer (keep_vars=True) load into this one, not the other
    shared = FusedMoE(E, K, H, I, quant_config=qc, has_bias=True, device="meta")
    shared.load_state_dict(src.state_dict(keep_vars=True), assign=True)
    assert shared.w13_weight.weight_loader.__self__ is shared
    w13, w2, b13, b2 = _weights(9)
    shared.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)  # a reload of the shared storage
    assert shared.load_rounds == 2 and src.load_rounds == 1


def test_assign_of_another_dtype_moves_params_dtype():
    src = _loaded(dtype=torch.float32)
    dst = FusedMoE(E, K, H, I, has_bias=True, device="meta")  # bf16
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.params_dtype == torch.float32 and dst.loader.layout.params_dtype == torch.float32
    with pytest.raises(TypeError, match="computes in params_dtype torch.float32"):
        dst(*_x())
    x, g = _x(dtype=torch.float32)
    assert torch.equal(dst(x, g), src(x, g))
    mixed = dict(src.state_dict())
    mixed["w13_bias"] = mixed["w13_bias"].bfloat16()
    other = FusedMoE(E, K, H, I, has_bias=True, device="meta")
    with pytest.raises(RuntimeError, match=r"assign=True\) would leave full-precision tensors of dtypes"):
        other.load_state_dict(mixed, assign=True)
    assert other.w13_weight.is_meta and other.load_state == "fresh"


@pytest.mark.parametrize("src_qc, dst_qc", [(Int8Config(), Fp8Config("channel")), (Fp8Config("channel"), Int8Config()),
                                            (None, Fp8Config("channel"))])
def test_state_dict_of_another_storage_format_is_refused(src_qc, dst_qc):
    """int8 and fp8-channel storage (and bf16 weights) have the same shapes: a copy would cast codes silently."""
    src = FusedMoE(E, K, H, I, quant_config=src_qc)
    src.load_weights(*random_moe_weights(E, H, I)[:2])
    dst = _loaded(dst_qc)
    dst.layer_name = "model.layers.2.mlp.experts"
    before = _bytes(dst)
    sd = src.state_dict()
    if src_qc is None:  # a full-precision state has no scales: give it the layer's own
        sd.update(w13_weight_scale=dst.w13_weight_scale.clone(), w2_weight_scale=dst.w2_weight_scale.clone())
    with pytest.raises(RuntimeError, match=r"model.layers.2.mlp.experts: w13_weight has dtype .* but the layer holds"):
        dst.load_state_dict(sd, strict=False)
    assert _same(_bytes(dst), before) and dst.load_rounds == 1
    with pytest.raises(RuntimeError, match="fp32 scales are never cast"):  # assign: a bf16 scale
        dst.load_state_dict({**dst.state_dict(), "w13_weight_scale": dst.w13_weight_scale.bfloat16()}, assign=True)
    assert dst.w13_weight_scale.dtype == torch.float32
    dst.load_state_dict({**dst.state_dict(), "w13_weight_scale": dst.w13_weight_scale.bfloat16()})  # a copy casts


def test_to_meta_then_to_empty_twice_starts_fresh_loads():
    layer = _loaded(Fp8Config("channel"))
    layer.to("meta")
    with pytest.raises(LoadError, match="on the meta device"):
        layer(*_x())
    layer.to_empty(device="cpu")
    assert layer.load_state == "fresh" and torch.equal(layer.w13_weight_scale, torch.ones_like(layer.w13_weight_scale))
    layer.to_empty(device="cpu")  # a second to_empty: new storage again, still fresh
    assert layer.load_state == "fresh" and layer.w13_weight.weight_loader.__self__ is layer
    with pytest.raises(LoadError, match="weights are not loaded"):
        layer(*_x())
    w13, w2, b13, b2 = _weights(0)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)
    assert torch.equal(layer(*_x()), _loaded(Fp8Config("channel"))(*_x()))


@pytest.mark.parametrize("scheme", ["fp8_block", "int4"])
def test_half_of_a_quantized_layer_then_forward_and_reload(scheme):
    layer = _loaded(CONFIGS[scheme])
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters() if "bias" not in n}
    x, g = _x()
    ref = layer(x, g)
    layer.half()
    assert layer.params_dtype == torch.float16 and layer.w13_bias.dtype == torch.float16
    assert {n: p.data_ptr() for n, p in layer.named_parameters() if "bias" not in n} == ptrs
    out = layer(x.half(), g)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    w13, w2, b13, b2 = _weights(3)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2)  # staged in fp16 now
    assert {n: p.data_ptr() for n, p in layer.named_parameters() if "bias" not in n} == ptrs


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_refused_conversions_leave_the_layer_as_it_was(scheme):
    layer = _loaded(CONFIGS[scheme])
    before, ptrs = _bytes(layer), {n: p.data_ptr() for n, p in layer.named_parameters()}
    for convert in (lambda m: m.to(torch.float64), lambda m: m.double(), lambda m: m.to("cpu", torch.float64),
                    lambda m: m.type(torch.int8)):
        with pytest.raises(TypeError, match="cannot convert the layer to torch.(float64|int8)"):
            convert(layer)
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            layer.cuda()
    assert _same(_bytes(layer), before) and {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs
    assert layer.params_dtype == torch.bfloat16 and layer.load_state == "loaded"
    layer(*_x())


def test_assign_takes_a_bf16_correction_bias_as_transformers_holds_it():
    src = FusedMoE(E, K, H, I, use_correction_bias=True)
    src.load_weights(*_weights(2)[:2], e_score_correction_bias=torch.rand(E))
    sd = {**src.state_dict(), "e_score_correction_bias": src.e_score_correction_bias.bfloat16()}
    dst = FusedMoE(E, K, H, I, use_correction_bias=True, device="meta")
    dst.load_state_dict(sd, assign=True)
    assert dst.e_score_correction_bias.dtype == torch.bfloat16 and dst.load_state == "loaded"
    with pytest.raises(RuntimeError, match="e_score_correction_bias has dtype torch.int64"):
        dst.load_state_dict({**sd, "e_score_correction_bias": torch.zeros(E, dtype=torch.int64)})
