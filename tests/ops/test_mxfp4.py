"""The mxfp4 weight format through the ops (docs/design.md §3): storage and dequantization bitwise against
transformers' GPT-OSS dequantizer (``convert_moe_packed_tensors``, an independent implementation), online
quantization against a from-the-spec oracle (OCP MX v1.0: shared exponent floor(log2 amax) - 2, E2M1 round to
nearest even with saturation), ``fused_experts`` on the reference and on the Triton kernels (interpreter on CPU),
bad input, opcheck.

SQNR of online mxfp4 on Gaussian weights: E2M1 has one mantissa bit and the OCP scale puts amax / scale in
[4, 8) (values above 6 saturate), measured 18.5-18.6 dB (3 seeds, up to 8x512x2048); the floor of 17 dB keeps a margin,
and a wrong nibble order, sign or scale bias gives ~0 dB or less. The ceiling of 21 dB catches a test that
accidentally compares a tensor with itself."""
import math

import pytest
import torch
from torch.library import opcheck

import torch_moe_ops
from torch_moe_ops.testing import sqnr_db

from .test_contract import UTILS, _compile_run

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _spec_quantize(w: torch.Tensor):
    """The OCP MX rule written out value by value: w [N, K] fp32 -> (codes [N, K] int, scale bytes [N, K/32])."""
    N, K = w.shape
    codes = torch.zeros(N, K, dtype=torch.int64)
    scales = torch.zeros(N, K // 32, dtype=torch.int64)
    for n in range(N):
        for g in range(K // 32):
            block = w[n, 32 * g:32 * (g + 1)].tolist()
            amax = max(abs(v) for v in block)
            e = max(-127, math.floor(math.log2(amax)) - 2) if amax > 0 else -127
            scales[n, g] = e + 127
            for i, v in enumerate(block):
                y = min(abs(v) / 2.0**e, 6.0)
                best = min(range(8), key=lambda c: (abs(E2M1[c] - y), c % 2))  # nearest, ties to the even code
                codes[n, 32 * g + i] = best | (8 if v < 0 else 0)
    return codes, scales


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def test_dequantize_is_transformers_bitwise():
    convert = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors
    E, N, K = 3, 10, 128
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (E, N, K // 32), dtype=torch.uint8)
    theirs = convert(blocks, scales, dtype=torch.float32).transpose(1, 2)  # they return [E, K, N]
    ours = torch_moe_ops.reference.dequantize_weight(blocks.view(E, N, K // 2), scales, "mxfp4")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(2, 16, 128), (37, 96)], ids=["E2-N16-K128", "2D-N37-K96"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantize_matches_the_spec_oracle(shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    w.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-30, 3.0, -7.9], dtype=dtype)  # zero, tiny, exact, saturating
    q, s = torch_moe_ops.quantize_weight(w, "mxfp4")
    assert q.dtype == torch.uint8 and q.shape == (*shape[:-1], shape[-1] // 2)
    assert s.dtype == torch.uint8 and s.shape == (*shape[:-1], shape[-1] // 32)
    w2 = w.float().reshape(-1, shape[-1])
    codes, scales = _spec_quantize(w2)
    assert torch.equal(s.reshape(-1, shape[-1] // 32), scales.to(torch.uint8))
    ours = q.reshape(-1, shape[-1] // 2)
    want = _pack(codes)
    # -0.0 codes: the spec oracle writes +0 for v == 0 (v < 0 is False); ours keeps the sign bit of -0.0
    same = (ours == want) | ((ours ^ want) == 0x08) | ((ours ^ want) == 0x80)
    assert same.all(), f"{(~same).sum()} bytes differ"



@pytest.mark.parametrize("shape", [(4, 64, 256), (96, 512)], ids=["E4-N64-K256", "2D-N96-K512"])
def test_sqnr_on_gaussian_weights(shape):
    w = torch.randn(shape) * 0.05
    q, s = torch_moe_ops.quantize_weight(w, "mxfp4")
    q3, s3 = (q, s) if q.dim() == 3 else (q[None], s[None])
    db = sqnr_db(w.reshape(q3.shape[0], -1, shape[-1]), torch_moe_ops.reference.dequantize_weight(q3, s3, "mxfp4"))
    assert 17.0 < db < 21.0, f"mxfp4 weight SQNR {db:.1f} dB"


def test_scale_bytes_for_zero_nan_and_ties():
    w = torch.zeros(3, 32)
    w[1, :4] = torch.tensor([4.0, 1.25, 2.5, 5.0])  # amax 5: scale 2^0; 1.25 -> 1.0 (tie to even), 2.5 -> 2, 5 -> 4
    w[2, 0] = float("nan")
    q, s = torch_moe_ops.reference.quantize_weight(w, "mxfp4")
    assert s[:, 0].tolist() == [0, 127, 255]  # all zero: 2^-127; amax 5: 2^0; NaN group: the E8M0 NaN byte
    deq = torch_moe_ops.reference.dequantize_weight(q[None], s[None], "mxfp4")[0]
    assert deq[0].eq(0).all() and deq[1, :4].tolist() == [4.0, 1.0, 2.0, 4.0] and deq[2].isnan().all()


def test_quantize_weight_into_keeps_storage_and_refuses_fp32_scales():
    w = torch.randn(2, 8, 64)
    q, s = torch_moe_ops.quantize_weight(w, "mxfp4")
    q2, s2 = torch.empty_like(q), torch.empty_like(s)
    torch_moe_ops.quantize_weight_into(w, q2, s2, "mxfp4")
    assert torch.equal(q, q2) and torch.equal(s, s2)
    with pytest.raises(TypeError, match=r"scale must have dtype .*uint8"):
        torch_moe_ops.quantize_weight_into(w, q2, s2.float(), "mxfp4")
    with pytest.raises(ValueError, match=r"\[1, G\] with G in \(32,\)"):
        torch_moe_ops.quantize_weight(w, "mxfp4", block_shape=[1, 64])
    with pytest.raises(ValueError, match=r"not divisible by the group size 32"):
        torch_moe_ops.quantize_weight(torch.randn(4, 48), "mxfp4")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation,bias,T", [("swigluoai", True, 9), ("silu", False, 1)])
def test_fused_experts_equals_dequantized_bf16(backend, activation, bias, T, monkeypatch):
    """mxfp4 values times power-of-two scales are exact in bf16: the op on packed weights equals the op on
    their dequantized bf16 copy (same backend, same accumulation order up to exact scalings)."""
    dev = "cpu"
    if backend == "triton":  # the GPU's kernels, or the interpreter's on CPU tensors
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            dev = "cuda"
        else:
            monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    torch.set_default_device(dev)
    try:
        _equals_dequantized(activation, bias, T)
    finally:
        torch.set_default_device(None)


@pytest.mark.cuda
@pytest.mark.parametrize("activation,bias,T", [("swigluoai", True, 9), ("silu", False, 1), ("silu", False, 300)])
def test_fused_experts_on_the_gpu_equals_dequantized_bf16(activation, bias, T):
    torch.set_default_device("cuda")
    try:
        _equals_dequantized(activation, bias, T)
    finally:
        torch.set_default_device(None)


def _equals_dequantized(activation, bias, T):
    E, k, H, I = 5, 2, 64, 96
    n1 = 2 * I
    w13, w2 = torch.randn(E, n1, H) * 0.1, torch.randn(E, H, I) * 0.1
    q13, s13 = torch_moe_ops.quantize_weight(w13, "mxfp4")
    q2, s2 = torch_moe_ops.quantize_weight(w2, "mxfp4")
    d13 = torch_moe_ops.reference.dequantize_weight(q13, s13, "mxfp4").bfloat16()
    d2 = torch_moe_ops.reference.dequantize_weight(q2, s2, "mxfp4").bfloat16()
    b13, b2 = (torch.randn(E, n1).bfloat16(), torch.randn(E, H).bfloat16()) if bias else (None, None)
    x = torch.randn(T, H).bfloat16()
    weights, ids = torch_moe_ops.topk_route(torch.randn(T, E), k)
    common = dict(activation=activation, w13_bias=b13, w2_bias=b2)
    got = torch_moe_ops.fused_experts(x, q13, q2, weights, ids, quant_scheme="mxfp4", w13_scale=s13, w2_scale=s2,
                                      **common)
    want = torch_moe_ops.fused_experts(x, d13, d2, weights, ids, **common)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert sqnr_db(want.float(), got.float()) > 40


def test_fused_experts_refuses_fp32_scales_and_opcheck():
    E, k, H, I, T = 4, 2, 64, 32, 3
    q13, s13 = torch_moe_ops.quantize_weight(torch.randn(E, 2 * I, H), "mxfp4")
    q2, s2 = torch_moe_ops.quantize_weight(torch.randn(E, H, I), "mxfp4")
    x = torch.randn(T, H).bfloat16()
    weights, ids = torch_moe_ops.topk_route(torch.randn(T, E), k)
    with pytest.raises(TypeError, match=r"w13_scale must have dtype .*uint8"):
        torch_moe_ops.fused_experts(x, q13, q2, weights, ids, quant_scheme="mxfp4", w13_scale=s13.float(),
                                    w2_scale=s2)
    opcheck(torch.ops.moe.fused_experts.default, (x, q13, q2, weights, ids),
            dict(quant_scheme="mxfp4", w13_scale=s13, w2_scale=s2), test_utils=UTILS)


def test_compile_fused_moe_no_recompiles():
    """``fused_moe`` on mxfp4 weights under ``torch.compile(fullgraph=True, dynamic=True)``: one graph for every T,
    equal to eager."""
    E, k, H, I = 6, 2, 64, 32
    q13, s13 = torch_moe_ops.quantize_weight(torch.randn(E, 2 * I, H) * 0.1, "mxfp4")
    q2, s2 = torch_moe_ops.quantize_weight(torch.randn(E, H, I) * 0.1, "mxfp4")
    gate = torch.randn(E, H) / 10

    def fn(x, gate, q13, q2, s13, s2):
        return torch_moe_ops.fused_moe(x, (x @ gate.t().to(x.dtype)).float(), q13, q2, k, quant_scheme="mxfp4",
                                       w13_scale=s13, w2_scale=s2, activation="swigluoai")

    _compile_run(fn, lambda t: (torch.randn(t, H).bfloat16() / 10, gate, q13, q2, s13, s2))
