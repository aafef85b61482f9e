"""``moe::quantize_weight_into``: same result as ``quantize_weight`` written into existing storage (fp8, a uint8
view of fp8 storage, int8), data_ptr unchanged, per-expert slices of a layer's buffer, 2-D input."""
import pytest
import torch

from . import oracle
import torch_moe_ops

from ._data import padded

SCHEMES = [
    pytest.param("fp8_tensor", None, 2, id="fp8_tensor-shards2"),
    pytest.param("fp8_channel", None, 1, id="fp8_channel"),
    pytest.param("fp8_block", None, 1, id="fp8_block-128x128"),
    pytest.param("fp8_block", [32, 32], 1, id="fp8_block-32x32"),
    pytest.param("int8_channel", None, 1, id="int8_channel"),
]



UINT8_VIEW = [pytest.param(*p.values, True, id=p.id + "-uint8-view") for p in SCHEMES if p.values[0].startswith("fp8")]


@pytest.mark.parametrize("shape", [(3, 176, 136), (176, 136)], ids=["E3-N176-K136", "2D-N176-K136"])
@pytest.mark.parametrize("scheme,block_shape,shards,as_uint8",
                         [pytest.param(*p.values, False, id=p.id) for p in SCHEMES] + UINT8_VIEW)
def test_quantize_weight_into(shape, scheme, block_shape, shards, as_uint8):
    """fp8 storage written natively or through a uint8 view (how a mutable fp8 buffer passes opcheck)."""
    w = (torch.randn(shape) / 10).to(torch.bfloat16)
    oq, os_ = oracle.quantize_weight(w, scheme, block_shape, shards)
    qweight = torch.full(shape, 7, dtype=torch.int8).view(oq.dtype)  # garbage that must be overwritten
    target = qweight.view(torch.uint8) if as_uint8 else qweight
    scale = torch.full(os_.shape, float("nan"))
    ptrs = (qweight.data_ptr(), scale.data_ptr())
    with torch.inference_mode():
        ret = torch_moe_ops.quantize_weight_into(w, target, scale, scheme, block_shape=block_shape, shards=shards)
    assert ret is None
    assert (qweight.data_ptr(), scale.data_ptr()) == ptrs
    torch.testing.assert_close(scale, os_, rtol=1e-6, atol=0)
    assert torch.equal(qweight.view(torch.int8), oq.view(torch.int8))


@pytest.mark.parametrize("scheme,block_shape,shards", SCHEMES)
def test_into_expert_slices_of_a_layer_buffer(scheme, block_shape, shards):
    """Streaming quantization: expert by expert into [E, N, K] / scale buffers, from strided sources."""
    E, N, K = 3, 80, 72
    w = torch.randn(E, N, K) / 10
    oq, os_ = oracle.quantize_weight(w, scheme, block_shape, shards)
    qbuf = torch.zeros(E, N, K, dtype=oq.dtype)
    sbuf = torch.zeros(os_.shape)
    for e in range(E):
        torch_moe_ops.quantize_weight_into(padded(w[e]), qbuf[e], sbuf[e], scheme, block_shape=block_shape,
                                           shards=shards)
    torch.testing.assert_close(sbuf, os_, rtol=1e-6, atol=0)
    assert torch.equal(qbuf.view(torch.int8), oq.view(torch.int8))
