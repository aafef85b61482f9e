"""Bad values on CUDA (``pytest -m cuda``; docs/design.md §3, §4, §8): the ops run without value checks there
(no host sync) unless TORCH_MOE_OPS_DEBUG=1, so the kernels themselves must keep NaN/Inf visible.

- A NaN token gives a NaN output row in every scheme; an inf token is non-finite where the reference is;
  every other row is bit for bit the row of a clean run.
- ±inf weights saturate with their sign under an inf scale, NaN weights give their unit a NaN scale, and a
  token routed to such an expert gets a non-finite output while the other tokens are untouched.
- A NaN correction bias never makes an expert preferred, and CUDA picks the reference's experts.
- Under TORCH_MOE_OPS_DEBUG=1 the ops layer refuses non-finite weights and biases instead.
"""
from __future__ import annotations

import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops import reference, testing
from torch_moe_ops.schemes import QUANT_SCHEMES, get_activation, get_weight_format
from torch_moe_ops.testing import random_moe_weights

pytestmark = pytest.mark.cuda
DEV = "cuda"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _no_value_checks(monkeypatch):
    """The CUDA hot path: no value checks (what a user gets without TORCH_MOE_OPS_DEBUG=1)."""
    monkeypatch.setenv("TORCH_MOE_OPS_DEBUG", "0")


def _tie_free_logits(T: int, E: int) -> torch.Tensor:
    """[T, E] on the GPU: each row a shuffled grid with spacing 8/E, so GPU and CPU rank experts alike."""
    perm = torch.argsort(torch.rand(T, E), dim=1).float()
    return ((perm - E // 2) * (8.0 / E)).to(DEV)


def _experts(E, H, I, scheme, activation, w13=None, w2=None):
    act = get_activation(activation)
    if w13 is None:
        w13, w2, _, _ = random_moe_weights(E, H, I, gated=act.gated, dtype=torch.bfloat16, device=DEV)
    q13, q2, s13, s2, block = testing.quantize_experts(w13, w2, scheme, activation)
    kw = testing.experts_kwargs(scheme, s13, s2, block)
    kw.update(activation=activation)
    return q13, q2, kw


def _on_cpu(kw):
    return {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}


CASES = [pytest.param(s, a, False, id=f"{s}-{a}") for s in QUANT_SCHEMES for a in ("silu", "silu_no_mul", "swigluoai")]
CASES += [pytest.param(s, "silu", True, id=f"{s}-silu-on_input") for s in QUANT_SCHEMES]


@pytest.mark.parametrize("scheme,activation,on_input", CASES)
def test_nan_token_row_only_cuda(scheme, activation, on_input):
    E, H, I, T, k = 60, 256, 128, 33, 6
    torch.manual_seed(0)
    q13, q2, kw = _experts(E, H, I, scheme, activation)
    kw.update(apply_router_weight_on_input=on_input)
    logits = torch.randn(T, E, device=DEV)
    logits[:, 1::2] = -INF  # odd experts empty
    clean = (torch.randn(T, H, device=DEV) / 10).bfloat16()
    x = clean.clone()
    x[1, 3] = NAN
    x[7, 100] = INF
    x[32, 0] = -INF
    with torch.inference_mode():
        out = moe.fused_moe(x, logits, q13, q2, k, **kw)
        good = moe.fused_moe(clean, logits, q13, q2, k, **kw)
    assert out[1].isnan().all(), f"{scheme}: the NaN token's row must be NaN"
    w, ids = reference.topk_route(logits.cpu(), k)
    ref = reference.fused_experts(x.cpu().float(), q13.cpu(), q2.cpu(), w, ids, **_on_cpu(kw))
    for row in (7, 32):  # non-finite exactly where the reference is (NaN vs inf may differ in the MMA)
        assert torch.equal(torch.isfinite(out[row]).cpu(), torch.isfinite(ref[row]))
    others = [r for r in range(T) if r not in (1, 7, 32)]
    assert torch.isfinite(out[others]).all()
    assert torch.equal(out[others], good[others]), "a bad token changed another token's output"


#: (format, block, shards) with the default tiles
FORMATS = [("fp8_channel", None, 1), ("fp8_block", None, 1), ("fp8_tensor", None, 2), ("int8_channel", None, 1),
           ("int4_group", None, 1)]
SATURATED = {"fp8": (448.0, -448.0), "int8": (127.0, -127.0), "int4": (7.0, -8.0)}


@pytest.mark.parametrize("name,block,shards", FORMATS)
def test_quantize_weight_non_finite_on_cuda(name, block, shards):
    """Through the op (no value check on CUDA): ±inf saturates under an inf scale, NaN makes the scale NaN."""
    fmt = get_weight_format(name)
    w = (torch.randn(3, 512, 1024, device=DEV) / 10).bfloat16()
    w[0, 1, 3], w[1, 300, 700], w[2, 5, 9] = INF, -INF, NAN
    q, s = moe.quantize_weight(w, name, block_shape=block, shards=shards)
    values = fmt.codec.decode(q.cpu())
    top, bottom = SATURATED[name.split("_")[0]]
    assert values[0, 1, 3] == top and values[1, 300, 700] == bottom
    deq = fmt.dequantize(q.cpu(), s.cpu(), fmt.block_shape(block))
    assert deq[0, 1, 3] == INF and deq[1, 300, 700] == -INF and deq[2, 5, 9].isnan()
    assert s.isinf().sum() == 2 and s.isnan().sum() == 1
    # the rest of the tensor: the reference's quantization of the clean weights
    clean = w.clone()
    clean[0, 1, 3] = clean[1, 300, 700] = clean[2, 5, 9] = 0
    _, rs = moe.quantize_weight(clean.cpu(), name, block_shape=block, shards=shards)
    fin = torch.isfinite(s.cpu())
    assert torch.equal(s.cpu()[fin], rs[fin])


@pytest.mark.parametrize("scheme", [s for s in QUANT_SCHEMES if s != "none"])
def test_bad_weight_poisons_its_expert_only(scheme):
    """An inf in expert 2's w2 and a NaN in expert 5's w13: their tokens' outputs are non-finite, never a
    finite wrong value; tokens of other experts are exactly the clean run's."""
    E, H, I, T, k = 8, 256, 128, 16, 1
    torch.manual_seed(1)
    w13, w2, _, _ = random_moe_weights(E, H, I, dtype=torch.bfloat16, device=DEV)
    bad13, bad2 = w13.clone(), w2.clone()
    bad2[2, 10, 20] = INF
    bad13[5, 7, 30] = NAN
    ids = (torch.arange(T, device=DEV) % E).to(torch.int32)[:, None]
    tw = torch.ones(T, 1, device=DEV)
    x = (torch.randn(T, H, device=DEV) / 10).bfloat16()
    with torch.inference_mode():
        q13, q2, kw = _experts(E, H, I, scheme, "silu", bad13, bad2)
        out = moe.fused_experts(x, q13, q2, tw, ids, **kw)
        g13, g2, gkw = _experts(E, H, I, scheme, "silu", w13, w2)
        good = moe.fused_experts(x, g13, g2, tw, ids, **gkw)
    hit = (ids[:, 0] == 2) | (ids[:, 0] == 5)
    assert not torch.isfinite(out[ids[:, 0] == 5]).any(), "a NaN weight row (scale NaN) must show in every output"
    assert not torch.isfinite(out[ids[:, 0] == 2][:, 10]).any(), "the inf weight's output column must be non-finite"
    assert torch.equal(out[~hit], good[~hit])


@pytest.mark.parametrize("G,kG", [(0, 0), (8, 2)], ids=["plain", "grouped"])
def test_non_finite_bias_routing_cuda(G, kG):
    E, T, k = 64, 33, 6
    logits = _tie_free_logits(T, E)
    bias = torch.randn(E, device=DEV) * 0.05
    bias[[1, 17, 40]] = NAN
    bias[3] = INF
    bias[9] = -INF
    w, ids = torch.ops.moe.topk_route(logits, k, True, "sigmoid", G, kG, bias)  # no CPU-side bias check on CUDA
    rw, rids = reference.topk_route(logits.cpu(), k, True, "sigmoid", G, kG, bias.cpu())
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-5)
    assert not torch.isin(ids.cpu(), torch.tensor([1, 17, 40, 9])).any() and (ids[:, 0] == 3).all()


def test_debug_mode_refuses_non_finite_on_cuda(monkeypatch):
    monkeypatch.setenv("TORCH_MOE_OPS_DEBUG", "1")
    w = torch.randn(2, 64, 64, device=DEV)
    w[1, 5, 7] = INF
    with pytest.raises(ValueError, match=r"w has non-finite values"):
        moe.quantize_weight(w, "fp8_channel")
    bias = torch.zeros(16, device=DEV)
    bias[3] = NAN
    with pytest.raises(ValueError, match="e_score_correction_bias has non-finite values"):
        moe.topk_route(torch.randn(4, 16, device=DEV), 2, e_score_correction_bias=bias)
    monkeypatch.setenv("TORCH_MOE_OPS_DEBUG", "0")
    q, s = moe.quantize_weight(w, "fp8_channel")  # no check, no sync: the kernel saturates instead
    assert s[1, 5] == INF and q[1, 5, 7].float() == 448.0
