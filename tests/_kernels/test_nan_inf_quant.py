"""Non-finite values through the Triton quantizers (docs/design.md §3), called directly: the ops layer refuses
NaN/Inf weights on CPU, so these launchers are the CUDA behaviour (no value check, no host sync) run through
the interpreter. GPU, or CPU with TRITON_INTERPRET=1.

- Activations (fp8_token / fp8_group, quantize_activation and act_and_quant) match the reference with NaN
  and ±inf: a NaN element makes its row's (group's) scale and values NaN; an inf gives scale inf and
  inf · 0 = NaN, like the reference.
- Weights: ±inf saturates with its sign (fp8 ±448, int8 ±127, int4 +7 / -8); the rest of its row, block,
  shard or group quantizes to 0 under the inf scale. A NaN makes its unit's scale NaN (fp8 also keeps the
  values NaN), so the dequantized unit is NaN. Every other unit is the reference's, bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import activation, quant, quant_tensor  # noqa: E402
from torch_moe_ops.schemes import get_activation, get_activation_quant, get_weight_format  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: NaN/inf arithmetic is the point here (numpy warns about it in the interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8) if q.dtype != torch.int8 else q.cpu()


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal values, NaN where the reference has NaN (fp32 views)."""
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=0, atol=0, equal_nan=True, msg=what)


def _check_act_quant(q, s, x_ref, aq, group, exact=True):
    """Kernel (q, s) against ``aq.quantize(x_ref)``: NaN / inf positions exactly; the finite values bit for
    bit (``exact``), or, after a Triton activation (fp32 math an ulp off torch's), scales to 1e-6 and q
    within one e4m3 step (tests/_kernels/test_activation_kernel.py)."""
    want_q, want_s = aq.quantize(x_ref, group)
    s, q = s.cpu(), q.cpu()
    assert torch.equal(s.isnan(), want_s.isnan()) and torch.equal(s.isinf(), want_s.isinf()), "scales' NaN/inf"
    nan = want_q.float().isnan()
    assert torch.equal(q.float().isnan(), nan), "NaN positions of q differ"
    if exact:
        _same(s, want_s, "scales")
        assert torch.equal(_bits(q)[~nan], _bits(want_q)[~nan]), "finite q differ"
        _same(aq.dequantize(q, s, group), aq.dequantize(want_q, want_s, group), "dequantized")
        return
    fin = torch.isfinite(want_s)
    torch.testing.assert_close(s[fin], want_s[fin], rtol=1e-6, atol=0)
    qf, rqf = q.float()[~nan], want_q.float()[~nan]
    assert ((qf - rqf).abs() <= rqf.abs() / 8 + 2.0**-9).all()
    deq, want = aq.dequantize(q, s, group), aq.dequantize(want_q, want_s, group)
    assert torch.equal(deq.isnan(), want.isnan())


@pytest.mark.parametrize("scheme,group,two_pass", [
    pytest.param("fp8_token", 128, False, id="token"),
    pytest.param("fp8_token", 128, True, id="token-two-pass"),
    pytest.param("fp8_group", 32, False, id="group32"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_activation_non_finite_like_reference(monkeypatch, scheme, group, two_pass, dtype):
    if two_pass:
        monkeypatch.setattr(activation, "_ONE_PASS_MAX", 64)  # rows of 100: amax loop, then quantize loop
    T, K = 7, 100
    x = (torch.randn(T, K) * 2).to(dtype)
    x[1, 7] = NAN
    x[2, 50] = INF
    x[3, 0] = -INF
    x[4] = NAN
    x[5, 99] = NAN  # in the partial last group
    aq = get_activation_quant(scheme)
    q, s = activation.quantize_activation(x.to(DEVICE), aq, group)
    _check_act_quant(q, s, x, aq, group)
    deq = aq.dequantize(q.cpu(), s.cpu(), group)
    if aq.grouped:  # only the NaN's group: the rest of the row is untouched
        assert deq[1, :32].isnan().all() and torch.isfinite(deq[1, 32:]).all()
        assert deq[5, 96:].isnan().all() and torch.isfinite(deq[5, :96]).all()
    else:
        assert deq[[1, 2, 3, 4, 5]].isnan().all()
    assert torch.isfinite(deq[[0, 6]]).all() and torch.isfinite(s.cpu()[[0, 6]]).all()


@pytest.mark.parametrize("act,limit", [("silu", 7.0), ("swigluoai", 7.0), ("gelu_tanh", 0.0), ("relu2_no_mul", 0.0)])
@pytest.mark.parametrize("scheme", ["fp8_token", "fp8_group"])
def test_act_and_quant_non_finite_like_reference(act, limit, scheme):
    """The activation keeps NaN (clamps and relu2 included), then the row / group is NaN like the reference."""
    a, aq = get_activation(act), get_activation_quant(scheme)
    T, n_out = 6, 48
    x = torch.randn(T, a.n1(n_out)).to(torch.bfloat16)
    x[1, 3] = NAN  # gate (or the only) column
    x[2, a.n1(n_out) - 1] = NAN  # up column (last), or the last column of a non-gated row
    x[3, 10] = INF
    x[4, 11] = -INF
    q, s = activation.act_and_quant(x.to(DEVICE), a, a.alpha(None), limit, aq, 16)
    _check_act_quant(q, s, a.reference(x, None, limit), aq, 16, exact=False)
    assert aq.dequantize(q.cpu(), s.cpu(), 16)[[1, 2]].isnan().any(dim=1).all()


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "swigluoai", "silu_no_mul", "relu2_no_mul"])
@pytest.mark.parametrize("limit", [0.0, 5.0])
def test_act_and_mul_non_finite_like_reference(act, limit):
    a = get_activation(act)
    x = torch.randn(5, a.n1(24)).to(torch.bfloat16)
    x[1, 2], x[1, a.n1(24) - 2] = NAN, NAN
    x[2, 0], x[3, 5], x[3, 6] = INF, -INF, INF
    out = activation.act_and_mul(x.to(DEVICE), a, a.alpha(None), limit)
    want = a.reference(x, None, limit).to(x.dtype)
    assert torch.equal(out.cpu().isnan(), want.isnan()) and torch.equal(out.cpu().isinf(), want.isinf())
    assert out.cpu()[1].isnan().any()
    fin = torch.isfinite(want)
    torch.testing.assert_close(out.cpu()[fin].float(), want[fin].float(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------ weights
#: (format, block, shards); K = 96 keeps whole int4 groups and two fp8 blocks along K.
FORMATS = [
    pytest.param("fp8_channel", None, 1, id="fp8_channel"),
    pytest.param("fp8_block", (16, 32), 1, id="fp8_block"),
    pytest.param("fp8_tensor", None, 2, id="fp8_tensor"),
    pytest.param("int8_channel", None, 1, id="int8_channel"),
    pytest.param("int4_group", (1, 32), 1, id="int4_group"),
]
#: the saturated values of +inf / -inf
SATURATED = {"fp8": (448.0, -448.0), "int8": (127.0, -127.0), "int4": (7.0, -8.0)}
PLUS, MINUS = (0, 1, 3), (1, 14, 40)  # (e, n, k) in different scale units of every format


def _units(fmt, block, shape, shards):
    """[E, N, K] int: the index of the scale each element uses."""
    sshape = fmt.scale_shape(shape, block, shards)
    ids = torch.arange(torch.Size(sshape).numel(), dtype=torch.float32).reshape(sshape)
    return fmt.expand(ids, shape, block).long()


def _quantize_with_kernel(w, fmt, block, shards):
    qshape = fmt.packed_shape(w.shape)
    q = torch.empty(qshape, dtype=fmt.qdtype, device=DEVICE)
    s = torch.full(fmt.scale_shape(w.shape, block, shards), -1.0, device=DEVICE)
    quant.quantize_weight_into(w.to(DEVICE), q, s, fmt, block, shards)
    return q.cpu(), s.cpu()


@pytest.fixture(params=[False, True], ids=["one-pass", "long-rows"])
def row_loops(request, monkeypatch):
    """long-rows: per-row formats take their two-loop path, per-tensor its many-chunk schedule."""
    if request.param:
        monkeypatch.setattr(quant, "_MAX_ROW", 64)
        monkeypatch.setattr(quant_tensor, "_TENSOR_TILE", 256)
        monkeypatch.setattr(quant_tensor, "_CHUNK", 256)
    return request.param


@pytest.mark.parametrize("name,block,shards", FORMATS)
def test_quantize_weight_inf_saturates_with_its_sign(name, block, shards, row_loops):
    fmt = get_weight_format(name)
    E, N, K = 2, 24, 96
    w = (torch.randn(E, N, K) * 0.1).to(torch.bfloat16)
    w[PLUS], w[MINUS] = INF, -INF
    q, s = _quantize_with_kernel(w, fmt, block, shards)
    units = _units(fmt, block, w.shape, shards)
    hit = torch.isin(units, torch.stack([units[PLUS], units[MINUS]]))
    # every other unit: the reference's q and scales, bit for bit
    want_q, want_s = fmt.quantize(w, block, shards)
    values, want_values = fmt.codec.decode(q), fmt.codec.decode(want_q)
    assert torch.equal(values[~hit], want_values[~hit])
    flat_s, flat_want = s.flatten(), want_s.flatten()
    others = torch.ones_like(flat_s, dtype=torch.bool)
    others[units[PLUS]] = others[units[MINUS]] = False
    assert torch.equal(flat_s[others], flat_want[others])
    # the hit units: scale inf, ±inf saturated with its sign, everything else 0
    assert flat_s[units[PLUS]] == INF and flat_s[units[MINUS]] == INF
    top, bottom = SATURATED[name.split("_")[0]]
    assert values[PLUS] == top and values[MINUS] == bottom
    rest = hit.clone()
    rest[PLUS] = rest[MINUS] = False
    assert (values[rest] == 0).all()
    # what a user gets: the dequantized unit is ±inf at the inf, NaN (0 · inf) elsewhere
    deq = fmt.dequantize(q, s, block)
    assert deq[PLUS] == INF and deq[MINUS] == -INF and deq[rest].isnan().all()


@pytest.mark.parametrize("name,block,shards", FORMATS)
def test_quantize_weight_nan_makes_its_unit_nan(name, block, shards, row_loops):
    fmt = get_weight_format(name)
    E, N, K = 2, 24, 96
    w = (torch.randn(E, N, K) * 0.1).to(torch.float16)
    w[PLUS] = NAN
    q, s = _quantize_with_kernel(w, fmt, block, shards)
    units = _units(fmt, block, w.shape, shards)
    hit = units == units[PLUS]
    want_q, want_s = fmt.quantize(w, block, shards)
    assert s.flatten()[units[PLUS]].isnan() and s.isnan().sum() == 1
    _same(s, want_s, "scales")  # NaN there, the reference's everywhere else
    values = fmt.codec.decode(q)
    assert torch.equal(values[~hit], fmt.codec.decode(want_q)[~hit])
    if fmt.qdtype.is_floating_point:  # fp8 holds NaN: the values say it too
        assert values[hit].isnan().all()
    deq = fmt.dequantize(q, s, block)
    assert deq[hit].isnan().all() and torch.isfinite(deq[~hit]).all()
