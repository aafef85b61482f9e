"""FusedMoE's tensors under nn.Module's conversions (``layer/storage.py``, docs/design.md §10.1): meta-device
construction + to_empty + reset_parameters, and dtype casts that never touch quantized storage, scales or the
correction bias (deepcopy and state dicts: test_storage_state_dict.py)."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from torch_moe_ops import Fp8Config, FusedMoE, Int8Config, LoadError, ParallelConfig
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint
from torch_moe_ops.testing import random_moe_weights, sqnr_db

from tests.moe_models import MoEModel, hf_checkpoint, moe_layers
from ._layer import CONFIGS, NAME, QUANT, E, H, I, K, _loaded, _x


# ------------------------------------------------------------------------------------ 1. meta construction
def _model(qc, device=None, **kw):
    kw = dict(quant_config=qc, has_bias=True, use_correction_bias=True, **kw)
    if device == "meta":
        with torch.device("meta"):
            return MoEModel(2, E, K, H, I, **kw)
    return MoEModel(2, E, K, H, I, **kw)


def _sd(**kw):
    sd = hf_checkpoint(2, E, H, I, correction_bias=True, **kw)
    for L in range(2):
        for e in range(E):
            for hf, n in (("gate_proj", I), ("up_proj", I), ("down_proj", H)):
                sd[f"model.layers.{L}.mlp.experts.{e}.{hf}.bias"] = torch.randn(n) / 10
    return sd


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_meta_model_to_empty_loads_and_matches_a_model_built_on_its_device(scheme):
    qc, sd = CONFIGS[scheme], _sd()
    model = _model(qc, "meta")
    layer = moe_layers(model)[0]
    x = torch.randn(3, 5, H, dtype=torch.bfloat16) / 2
    with pytest.raises(LoadError, match="on the meta device .*to_empty"):
        layer(x, torch.randn(3, 5, E))
    model.to_empty(device="cpu")
    for layer in moe_layers(model):
        assert not any(t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))
        assert layer.load_state == "fresh"
        assert all(getattr(layer, n).weight_loader.__self__ is layer
                   for n in ("w13_weight", "w2_weight", "w13_bias", "w2_bias", "e_score_correction_bias"))
        assert not layer.w13_bias.any() and not layer.w2_bias.any() and not layer.e_score_correction_bias.any()
        if qc is None:
            assert layer.full_precision["w13_weight"] is layer.w13_weight
        else:
            assert (layer.w13_weight_scale == 1).all() and (layer.w2_weight_scale == 1).all()
    ref = _model(qc)
    for m in (model, ref):
        load_checkpoint(m, sd, progress=False)
        finalize_loading(m)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


def test_meta_parallel_layer_gets_its_placement_tables():
    pc = ParallelConfig(num_redundant_experts=2)
    with torch.device("meta"):
        layer = FusedMoE(E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)), parallel=pc)
    layer.to_empty(device="cpu", recurse=False)  # FSDP1's param_init_fn does this per module
    for name, table in layer.placement.initial_tables().items():
        if table is not None:
            assert torch.equal(getattr(layer, name), table)
    assert not layer.expert_load.any()
    ref = FusedMoE(E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)), parallel=pc)
    sd = {k: v for k, v in hf_checkpoint(1, E, H, I, router=False).items()}
    for m in (layer, ref):
        load_checkpoint(m, sd, progress=False)
        finalize_loading(m)
    x, logits = _x(7)
    torch.testing.assert_close(layer(x, logits), ref(x, logits), atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["none", "fp8_channel"])
def test_reset_parameters_starts_a_fresh_load_in_place(scheme):
    layer = _loaded(CONFIGS[scheme], has_bias=True, use_correction_bias=True)
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    layer.reset_parameters()
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs
    assert layer.load_state == "fresh" and not layer.w2_bias.any() and not layer.e_score_correction_bias.any()
    with pytest.raises(LoadError, match="not loaded"):
        layer(*_x(3))
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2, e_score_correction_bias=torch.rand(E))
    assert layer(*_x(3)).shape == (3, H)


def test_to_meta_drops_the_load_state():
    layer = _loaded(Fp8Config("channel"))
    layer.to("meta")
    assert layer.load_state == "fresh" and layer.w13_weight.dtype == torch.float8_e4m3fn
    with pytest.raises(LoadError, match="meta device"):
        layer(*_x(3))


@pytest.mark.parametrize("scheme", ["none", "fp8_block"])
def test_fake_tensor_mode_still_builds_loads_and_runs(scheme):
    state = _loaded(CONFIGS[scheme]).state_dict()
    with FakeTensorMode(allow_non_fake_inputs=True):
        layer = FusedMoE(E, K, H, I, quant_config=CONFIGS[scheme])
        layer.load_state_dict(state)
        out = layer(*_x(3, 5))
        assert out.shape == (3, 5, H) and layer.load_state == "loaded"
        layer.layer_name = NAME
        with pytest.raises(TypeError, match="hidden_states has dtype torch.float64"):
            layer(*_x(3, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------------ 2. dtype casts
CASTS = {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(), "float": lambda m: m.float(),
         "to_cpu_fp32": lambda m: m.to("cpu", torch.float32)}
TARGET = {"to_bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32, "to_cpu_fp32": torch.float32}


@pytest.mark.parametrize("scheme", QUANT)
@pytest.mark.parametrize("cast", list(CASTS))
def test_dtype_casts_keep_quantized_storage_scales_and_correction_bias(scheme, cast):
    start = torch.float32 if cast == "to_bf16" else torch.bfloat16
    layer = _loaded(CONFIGS[scheme], dtype=start, has_bias=True, use_correction_bias=True)
    kept = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "e_score_correction_bias")
    before = {n: (getattr(layer, n).data_ptr(), getattr(layer, n).dtype, getattr(layer, n).clone()) for n in kept}
    x, logits = _x(3, 5)
    ref = layer(x, logits).float()
    model = nn.Sequential(layer)
    CASTS[cast](model)
    new = TARGET[cast]
    for n, (ptr, dtype, value) in before.items():
        t = getattr(layer, n)
        assert (t.data_ptr(), t.dtype) == (ptr, dtype) and torch.equal(t.view(torch.uint8), value.view(torch.uint8)), n
    assert layer.w13_bias.dtype == layer.w2_bias.dtype == new
    assert layer.params_dtype == new and layer.loader.layout.params_dtype == new
    assert all(t.dtype == new and t.is_meta for t in layer.full_precision.values())
    assert layer.is_loaded and sqnr_db(ref, layer(x.to(new), logits).float()) > 30
    # a reload stages in the new dtype, in place
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True, dtype=torch.float32)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2, e_score_correction_bias=torch.rand(E))
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs
    assert layer.expert_nbytes == (2 * I + I) * H * new.itemsize


@pytest.mark.parametrize("cast", list(CASTS))
def test_unquantized_cast_moves_params_dtype_and_the_input_check(cast):
    start = torch.float32 if cast == "to_bf16" else torch.bfloat16
    layer = _loaded(dtype=start, has_bias=True, use_correction_bias=True, trainable=True)
    ptr = layer.e_score_correction_bias.data_ptr()
    CASTS[cast](layer)
    new = TARGET[cast]
    assert layer.w13_weight.dtype == layer.w2_bias.dtype == layer.params_dtype == new
    assert layer.w13_weight.requires_grad and layer.full_precision["w13_weight"] is layer.w13_weight
    assert layer.e_score_correction_bias.dtype == torch.float32 and layer.e_score_correction_bias.data_ptr() == ptr
    assert layer.w13_weight.weight_loader.__self__ is layer
    x, logits = _x(3, 5, dtype=new)
    assert layer(x, logits).dtype == new
    if new != start:
        with pytest.raises(TypeError, match=f"params_dtype {new}"):
            layer(x.to(start), logits)
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=True, dtype=torch.float32)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2, e_score_correction_bias=torch.rand(E))
    torch.testing.assert_close(layer.w13_weight, w13.to(new), atol=0, rtol=0)


def test_cast_with_a_device_move_keeps_the_quantized_dtype():
    layer = _loaded(Int8Config(), has_bias=True)
    q = FusedMoE(E, K, H, I, quant_config=Fp8Config("block", block_shape=(32, 32)), use_correction_bias=True)
    for m in (layer, q):
        m.to(device="meta", dtype=torch.float16)  # the device part applies, the dtype part does not
        assert m.w13_weight.is_meta and m.w13_weight.dtype in (torch.int8, torch.float8_e4m3fn)
        assert m.params_dtype == torch.float16
    assert layer.w13_bias.dtype == torch.float16 and layer.w13_weight_scale.dtype == torch.float32
    assert q.e_score_correction_bias.is_meta and q.e_score_correction_bias.dtype == torch.float32


def test_swap_tensors_conversion_path_keeps_addresses():
    layer = _loaded(Fp8Config("channel"), has_bias=True)
    ptr = layer.w13_weight.data_ptr()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.half()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert layer.w13_weight.data_ptr() == ptr and layer.w13_weight.dtype == torch.float8_e4m3fn
    assert layer.w13_bias.dtype == torch.float16 and layer(*_x(3, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("scheme", ["none", "int4"])
def test_unsupported_casts_are_refused_before_anything_changes(scheme):
    layer = _loaded(CONFIGS[scheme], has_bias=True)
    with pytest.raises(TypeError, match=f"{NAME}: cannot convert the layer to torch.float64"):
        layer.double()
    assert layer.w13_bias.dtype == layer.params_dtype == torch.bfloat16 and layer.is_loaded
