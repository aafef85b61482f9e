"""Bad values never hide (docs/design.md §3, §8): a NaN in one token's hidden state gives NaN in that token's
output row only, in every scheme, activation layout and on-input weighting, on the reference and on the
Triton kernels (TORCH_MOE_OPS_BACKEND=triton, CPU through the interpreter). An Inf gives what the reference
gives (non-finite exactly where it is). Every other row is bit for bit the row of a run without the bad
tokens. The GPU counterpart is tests/ops/test_nan_inf_cuda.py."""
from __future__ import annotations

import os

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import reference
from torch_moe_ops.schemes import QUANT_SCHEMES, get_activation, get_quant_scheme
from torch_moe_ops.testing import random_moe_weights, w13_shards

NAN, INF = float("nan"), float("inf")
#: NaN/inf arithmetic is the point here (numpy warns about it in the interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton CPU backend needs TRITON_INTERPRET=1"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", request.param)
    return request.param


def _experts(E, H, I, scheme, activation):
    """Quantized (or bf16) weights and the fused_moe keyword arguments of one scheme."""
    act, sch = get_activation(activation), get_quant_scheme(scheme)
    w13, w2, _, _ = random_moe_weights(E, H, I, gated=act.gated, dtype=torch.bfloat16)
    kw = dict(activation=activation)
    if sch.quantized:
        block = [16, 16] if sch.flags.BLOCK_SCALES else ([1, 32] if sch.tiled else None)
        w13, s13 = moe.quantize_weight(w13, sch.weight.name, shards=w13_shards(sch, act), block_shape=block)
        w2, s2 = moe.quantize_weight(w2, sch.weight.name, block_shape=block)
        kw.update(quant_scheme=scheme, w13_scale=s13, w2_scale=s2, block_shape=block)
    return w13, w2, kw


def _reference(x, logits, w13, w2, k, kw):
    w, ids = reference.topk_route(logits, k)
    return reference.fused_experts(x.float(), w13, w2, w, ids, **kw)


CASES = [pytest.param(s, a, False, id=f"{s}-{a}") for s in QUANT_SCHEMES for a in ("silu", "silu_no_mul", "swigluoai")]
CASES += [pytest.param(s, "silu", True, id=f"{s}-silu-on_input") for s in QUANT_SCHEMES]


@pytest.mark.parametrize("scheme,activation,on_input", CASES)
def test_nan_row_stays_in_its_row(backend, scheme, activation, on_input):
    E, H, I, T, k = 5, 32, 32, 7, 2  # E not a power of two; expert 4 gets no token (empty)
    w13, w2, kw = _experts(E, H, I, scheme, activation)
    kw.update(apply_router_weight_on_input=on_input)
    logits = torch.randn(T, E)
    logits[:, 4] = -INF
    clean = (torch.randn(T, H) / 10).bfloat16()
    x = clean.clone()
    x[1, 3] = NAN
    x[4, 10] = INF
    x[5, 0] = -INF
    out = moe.fused_moe(x, logits, w13, w2, k, **kw)
    assert out[1].isnan().all(), f"{backend}/{scheme}: the NaN token's row must be NaN"
    ref = _reference(x, logits, w13, w2, k, kw)
    for row in (4, 5):  # an inf token: non-finite exactly where the reference is
        assert torch.equal(out[row].isnan(), ref[row].isnan()) and torch.equal(out[row].isinf(), ref[row].isinf())
    assert not torch.isfinite(out[4]).all()
    others = [0, 2, 3, 6]
    good = moe.fused_moe(clean, logits, w13, w2, k, **kw)
    assert torch.isfinite(out[others]).all()
    assert torch.equal(out[others], good[others]), "a bad token changed another token's output"


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_single_nan_token_k1(backend, scheme):
    """T = 1, k = 1 (GEMM2 writes the output directly, no moe_sum)."""
    w13, w2, kw = _experts(3, 64, 32, scheme, "silu")
    x = (torch.randn(1, 64) / 10).bfloat16()
    x[0, 63] = NAN
    out = moe.fused_moe(x, torch.randn(1, 3), w13, w2, 1, **kw)
    assert out.shape == (1, 64) and out.isnan().all()
