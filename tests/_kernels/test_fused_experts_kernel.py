"""Triton fused experts (``_kernels.fused_experts``) against ``reference.fused_experts`` (docs/design.md §8,
§13), on CPU through the Triton interpreter (``TRITON_INTERPRET=1``) with tiny shapes, or on a GPU.

The launcher gets what the ops layer passes: registry objects, canonical scales and tiles, resolved
floats (``_experts.fused_experts``). Quantized schemes are compared with the reference on the SAME
quantized weights, so only kernel error (accumulation order, intermediates rounded to x's dtype before
re-quantization) is measured; int4 is compared with an unquantized fp32 run on its dequantized weights.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops import reference  # noqa: E402
from torch_moe_ops._platform import DEBUG_ENV  # noqa: E402
from torch_moe_ops.reference.quant import quantize_weight  # noqa: E402
from torch_moe_ops.schemes import get_quant_scheme, get_weight_format  # noqa: E402

from ._experts import (  # noqa: E402
    DEVICE,
    DTYPES,
    REL_TOL,
    REL_TOL_FP8,
    WEIGHT_SCHEME,
    _rel_err,
    _routing,
    _weights,
    fused_experts,
)

# Rows of GEMM1's buffer for dropped (non-local / out-of-range) pairs are never written; the activation
# runs over their garbage and NumPy warns about overflow there. Those rows are never read again.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _run_case(T, E, k, H, I, activation="silu", dtype="bf16", scheme="none", routing="random", ep=False,
              bias=False, on_input=False, strided=False, block=(32, 32), limit=0.0, w_scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    gated = not activation.endswith("_no_mul")
    N1 = 2 * I if gated else I
    E_g = 2 * E if ep else E
    x = torch.randn(T, H, generator=gen) / 10
    w13 = _weights(E, N1, H, gen, strided, w_scale)
    w2 = _weights(E, H, I, gen, strided)
    topk_w, topk_ids = _routing(T, E_g, k, routing, gen)
    expert_map = None
    if ep:  # a random half of the global experts is local, in a shuffled order
        expert_map = torch.full((E_g,), -1, dtype=torch.int32)
        expert_map[torch.randperm(E_g, generator=gen)[:E]] = torch.arange(E, dtype=torch.int32)
    b13 = torch.randn(E, N1, generator=gen) / 10 if bias else None
    b2 = torch.randn(E, H, generator=gen) / 10 if bias else None

    s13 = s2 = None
    block_shape = block if get_quant_scheme(scheme).tiled else None
    if scheme != "none":
        ws = WEIGHT_SCHEME[scheme]
        shards = 2 if scheme == "fp8_tensor" and gated else 1
        if scheme == "fp8_tensor" and activation == "swigluoai":
            # Interleaved gate/up rows (g0, u0, g1, ...): scale column n % 2 (quantize_weight assumes halves).
            s13 = torch.stack([w13[:, 0::2].abs().amax((1, 2)), w13[:, 1::2].abs().amax((1, 2))], 1)
            s13 = s13.clamp_min(1e-4) / 448.0
            q13 = (w13 / s13.repeat(1, I)[:, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            q13, s13 = quantize_weight(w13, ws, block_shape, shards)
        q2, s2 = quantize_weight(w2, ws, block_shape, 1)
        if strided:  # keep the padded strides on the quantized weights too
            Hq = q13.shape[2]  # H / pack
            q13 = torch.empty(E, N1 + 3, Hq + 128, dtype=q13.dtype)[:, :N1, :Hq].copy_(q13)
        w13_ref, w2_ref, w13, w2 = q13, q2, q13, q2
    else:
        w13_ref, w2_ref = w13, w2
        w13, w2 = w13.to(dt), w2.to(dt)

    kwargs = dict(activation=activation, expert_map=expert_map, apply_router_weight_on_input=on_input,
                  activation_limit=limit, block_shape=block_shape)
    # Quantized: the reference quantizes the same x values the kernel sees (x rounded to x's dtype).
    ref_scheme, ref_s13, ref_s2 = scheme, s13, s2
    if scheme == "int4_w4a16":  # an independent reference: plain fp32 experts on the dequantized weights
        fmt = get_weight_format("int4_group")
        w13_ref, w2_ref = fmt.dequantize(q13, s13, block_shape), fmt.dequantize(q2, s2, block_shape)
        ref_scheme, ref_s13, ref_s2 = "none", None, None
    ref = reference.fused_experts(
        x if scheme == "none" else x.to(dt).float(), w13_ref, w2_ref, topk_w, topk_ids, quant_scheme=ref_scheme,
        w13_scale=ref_s13, w2_scale=ref_s2, w13_bias=b13, w2_bias=b2,
        **{**kwargs, "block_shape": block_shape if ref_scheme != "none" else None})

    def dev(t):
        return t.to(DEVICE) if t is not None else None

    out = fused_experts(
        dev(x.to(dt)), dev(w13), dev(w2), dev(topk_w), dev(topk_ids), quant_scheme=scheme,
        w13_scale=dev(s13), w2_scale=dev(s2), w13_bias=dev(b13 if b13 is None else b13.to(dt)),
        w2_bias=dev(b2 if b2 is None else b2.to(dt)), **{**kwargs, "expert_map": dev(expert_map)})
    assert out.shape == (T, H) and out.dtype == dt
    return out.cpu(), ref


CASES = [
    # (T, E, k, H, I), kwargs
    pytest.param((1, 4, 2, 40, 24), {}, id="E4-k2-T1-H40-I24-silu"),
    pytest.param((7, 4, 2, 72, 36), {"dtype": "fp16"}, id="E4-k2-T7-H72-I36-silu-fp16"),
    pytest.param((33, 4, 2, 40, 24), {}, id="E4-k2-T33-H40-I24-silu"),
    pytest.param((33, 3, 1, 40, 24), {"dtype": "fp32"}, id="E3-k1-T33-H40-I24-silu-fp32"),
    pytest.param((33, 3, 2, 72, 24), {"activation": "gelu"}, id="E3-k2-T33-H72-I24-gelu"),
    pytest.param((7, 4, 2, 40, 36), {"activation": "gelu_tanh", "dtype": "fp16"}, id="E4-k2-T7-H40-I36-gelu_tanh"),
    pytest.param((7, 4, 2, 40, 24), {"activation": "silu_no_mul"}, id="E4-k2-T7-H40-I24-silu_no_mul"),
    pytest.param((7, 3, 2, 40, 24), {"activation": "gelu_no_mul"}, id="E3-k2-T7-H40-I24-gelu_no_mul"),
    pytest.param((7, 4, 1, 40, 36), {"activation": "gelu_tanh_no_mul"}, id="E4-k1-T7-H40-I36-gelu_tanh_no_mul"),
    pytest.param((7, 4, 2, 72, 24), {"activation": "relu2_no_mul", "dtype": "fp32"},
                 id="E4-k2-T7-H72-I24-relu2_no_mul"),
    pytest.param((7, 4, 2, 40, 24), {"activation": "swigluoai", "limit": 7.0, "bias": True, "w_scale": 1.0},
                 id="E4-k2-T7-H40-I24-swigluoai-L7-bias"),
    pytest.param((7, 4, 2, 40, 24), {"limit": 7.0, "w_scale": 1.0}, id="E4-k2-T7-H40-I24-silu-L7"),
    pytest.param((33, 4, 2, 40, 24), {"routing": "empty"}, id="E4-k2-T33-H40-I24-empty-experts"),
    pytest.param((33, 4, 1, 40, 24), {"routing": "one"}, id="E4-k1-T33-H40-I24-one-expert"),
    pytest.param((33, 4, 2, 40, 24), {"routing": "one", "dtype": "fp16"}, id="E4-k2-T33-H40-I24-same-experts"),
    pytest.param((33, 4, 2, 40, 24), {"ep": True}, id="E4-k2-T33-H40-I24-ep-half-local"),
    pytest.param((7, 4, 2, 40, 24), {"bias": True, "dtype": "fp16"}, id="E4-k2-T7-H40-I24-bias"),
    pytest.param((33, 4, 2, 40, 24), {"on_input": True}, id="E4-k2-T33-H40-I24-weight-on-input"),
    pytest.param((7, 3, 2, 72, 36), {"strided": True}, id="E3-k2-T7-H72-I36-strided"),
    # quantized
    pytest.param((33, 4, 2, 40, 24), {"scheme": "fp8_tensor"}, id="E4-k2-T33-H40-I24-fp8_tensor-E2"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_tensor", "activation": "swigluoai", "limit": 7.0},
                 id="E4-k2-T7-H40-I24-fp8_tensor-E2-interleaved"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_tensor", "activation": "silu_no_mul", "dtype": "fp32"},
                 id="E4-k2-T7-H40-I24-fp8_tensor-E1-no_mul"),
    pytest.param((33, 3, 2, 72, 36), {"scheme": "fp8_channel", "dtype": "fp16"}, id="E3-k2-T33-H72-I36-fp8_channel"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_channel", "ep": True, "bias": True},
                 id="E4-k2-T7-H40-I24-fp8_channel-ep-bias"),
    pytest.param((33, 4, 2, 72, 36), {"scheme": "fp8_block", "block": (32, 32)}, id="E4-k2-T33-H72-I36-fp8_block32"),
    pytest.param((7, 3, 2, 40, 24), {"scheme": "fp8_block", "block": (16, 32), "dtype": "fp32", "on_input": True},
                 id="E3-k2-T7-H40-I24-fp8_block16x32-on-input"),
    pytest.param((7, 4, 1, 72, 36), {"scheme": "fp8_block", "block": (32, 32), "strided": True, "routing": "empty"},
                 id="E4-k1-T7-H72-I36-fp8_block32-strided-empty"),
    pytest.param((33, 4, 2, 40, 24), {"scheme": "int8_w8a16"}, id="E4-k2-T33-H40-I24-int8_w8a16"),
    pytest.param((7, 3, 2, 72, 36), {"scheme": "int8_w8a16", "dtype": "fp16", "bias": True, "strided": True},
                 id="E3-k2-T7-H72-I36-int8_w8a16-bias-strided"),
    # int4 groups along K (H and I multiples of G)
    pytest.param((33, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32)}, id="E4-k2-T33-H64-I32-int4-G32"),
    pytest.param((1, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32)}, id="E4-k2-T1-H64-I32-int4-G32"),
    pytest.param((7, 3, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "dtype": "fp16", "bias": True,
                                     "strided": True}, id="E3-k2-T7-H64-I32-int4-G32-bias-strided"),
    pytest.param((7, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "activation": "silu_no_mul"},
                 id="E4-k2-T7-H64-I32-int4-G32-silu_no_mul"),
    pytest.param((7, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "activation": "relu2_no_mul",
                                     "dtype": "fp32"}, id="E4-k2-T7-H64-I32-int4-G32-relu2_no_mul-fp32"),
    pytest.param((7, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "activation": "swigluoai",
                                     "limit": 7.0, "bias": True, "w_scale": 1.0},
                 id="E4-k2-T7-H64-I32-int4-G32-swigluoai-L7-bias"),
    pytest.param((33, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "ep": True},
                 id="E4-k2-T33-H64-I32-int4-G32-ep-half-local"),
    pytest.param((33, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "on_input": True},
                 id="E4-k2-T33-H64-I32-int4-G32-weight-on-input"),
    pytest.param((33, 4, 2, 64, 32), {"scheme": "int4_w4a16", "block": (1, 32), "routing": "empty"},
                 id="E4-k2-T33-H64-I32-int4-G32-empty-experts"),
    pytest.param((7, 3, 1, 64, 64), {"scheme": "int4_w4a16", "block": (1, 64), "activation": "gelu_tanh"},
                 id="E3-k1-T7-H64-I64-int4-G64-gelu_tanh"),
    pytest.param((5, 2, 2, 128, 128), {"scheme": "int4_w4a16", "block": (1, 128), "dtype": "fp16"},
                 id="E2-k2-T5-H128-I128-int4-G128"),
]


@pytest.mark.parametrize("shape,kw", CASES)
def test_fused_experts_matches_reference(shape, kw):
    out, ref = _run_case(*shape, **kw)
    dtype, scheme = kw.get("dtype", "bf16"), kw.get("scheme", "none")
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    if scheme.startswith("fp8"):
        assert err < REL_TOL_FP8[dtype], f"relative error {err:.3g}"
    else:  # int8 / int4 weight-only is exact in the weights (|q| <= 127 fits bf16/fp16): the plain bounds
        atol = 2e-2 * float(ref.abs().max().clamp_min(1.0))  # §13 atol, scaled for the w_scale=1 cases
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
        assert err < REL_TOL[dtype], f"relative error {err:.3g}"


@pytest.fixture
def poison_unwritten(monkeypatch):
    """Debug mode fills the never-written rows of the GEMM2 buffer with NaN: a read of one shows."""
    monkeypatch.setenv(DEBUG_ENV, "1")


@pytest.mark.parametrize("T", [7, 1])
def test_out_of_range_ids_contribute_zero(poison_unwritten, T):
    """ids outside [0, E) (and -1) are dropped by the alignment (T = 1: by the GEMMs, which read the ids
    themselves) and skipped by moe_sum: no OOB access, zero contribution, their unwritten (NaN-poisoned) buffer
    rows never read."""
    gen = torch.Generator().manual_seed(1)
    E, k, H, I = 4, 3, 40, 24
    x = torch.randn(T, H, generator=gen) / 10
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / 10, torch.randn(E, H, I, generator=gen) / 10
    w, ids = _routing(T, E, k, "random", gen)
    ids[0, 0], ids[T // 2, 1], ids[-1, 2] = E, -1, E + 100
    ref = reference.fused_experts(x, w13, w2, w, ids)
    out = fused_experts(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), w.to(DEVICE), ids.to(DEVICE)).cpu()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["none", "fp8_channel", "int4_w4a16"])
def test_non_local_pairs_never_read(poison_unwritten, scheme):
    H, I = (64, 32) if scheme == "int4_w4a16" else (40, 24)
    for T in (33, 1):
        out, ref = _run_case(T, 4, 3, H, I, scheme=scheme, ep=True, block=(1, 32))
        assert torch.isfinite(out).all(), T
        assert _rel_err(out, ref) < (REL_TOL_FP8 if scheme != "none" else REL_TOL)["bf16"], T
