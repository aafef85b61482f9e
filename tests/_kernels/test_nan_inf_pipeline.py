"""Non-finite values in the grouped GEMM, the router and moe_sum kernels (docs/design.md §3, §4, §8.2), called
directly (the ops layer refuses a non-finite weight or correction bias on CPU; on CUDA it checks only under
TORCH_MOE_OPS_DEBUG=1).

- GEMM, every scheme: a NaN / inf activation row and a NaN weight (its scale unit NaN) are non-finite in
  the output exactly where ``dequantize(a) @ dequantize(w)ᵀ`` is (the interpreter's fp8 dot reads the e4m3
  NaN byte as 480: the kernel upcasts it there).
- Routing: a NaN selection score counts as -inf: a NaN bias never makes an expert preferred, +inf + -inf in
  a group's top-two sum never makes a group preferred; kernel and ``reference.topk_route`` agree.
- moe_sum propagates a NaN of a summed slot and never reads a dropped one.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import activation, quant, routing  # noqa: E402
from torch_moe_ops._kernels import moe_sum as sum_kernels  # noqa: E402
from torch_moe_ops._kernels.align import align_block_size  # noqa: E402
from torch_moe_ops._kernels.configs import TileConfig  # noqa: E402
from torch_moe_ops._kernels.gemm import invoke_moe_gemm  # noqa: E402
from torch_moe_ops.reference import moe_sum as ref_moe_sum  # noqa: E402
from torch_moe_ops.reference.routing import topk_route as ref_topk_route  # noqa: E402
from torch_moe_ops.schemes import QUANT_SCHEMES, get_quant_scheme  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: NaN/inf arithmetic is the point here (numpy warns about it in the interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")


def _weights_for(sch, w, block):
    """(stored weights, kernel-view scale, fp32 dequantized [E, N, K]) of ``w`` in ``sch``'s format."""
    if not sch.quantized:
        wq = w.to(torch.bfloat16)
        return wq.to(DEVICE), None, wq.float()
    fmt = sch.weight
    q = torch.empty(fmt.packed_shape(w.shape), dtype=fmt.qdtype, device=DEVICE)
    s = torch.empty(fmt.scale_shape(w.shape, block, 1), dtype=fmt.scale_dtype, device=DEVICE)
    quant.quantize_weight_into(w.to(DEVICE), q, s, fmt, block, 1)
    return q, sch.canonical_scale(s), fmt.dequantize(q.cpu(), s.cpu(), block)


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_gemm_non_finite_where_the_reference_is(scheme):
    sch = get_quant_scheme(scheme)
    T, k, E, N, K = 6, 2, 3, 40, 64
    block = (32, 32) if sch.flags.BLOCK_SCALES else ((1, 32) if sch.tiled else None)
    x = torch.randn(T, K).to(torch.bfloat16)
    x[1, 5], x[2, 7] = NAN, INF
    w = torch.randn(E, N, K) * 0.1
    w[0, 3, 9] = NAN  # expert 0's row 3: NaN, its scale unit too (the whole expert for fp8_tensor)
    wq, w_scale, w_ref = _weights_for(sch, w, block)
    a, a_scale, a_ref = x.to(DEVICE), None, x.float()
    if sch.act is not None:
        group = sch.act_group(block)
        a, a_scale = activation.quantize_activation(a, sch.act, group)
        a_ref = sch.act.dequantize(a.cpu(), a_scale.cpu(), group)
    ids = torch.rand(T, E).topk(k, dim=-1).indices.to(torch.int32)
    ids[1:3, 0] = 0  # the bad tokens also meet the bad expert
    cfg = TileConfig(16, 32, 32, 1, 4, 1)
    c = torch.zeros(T * k, N, dtype=torch.bfloat16, device=DEVICE)
    invoke_moe_gemm(a, wq, c, *align_block_size(ids.to(DEVICE), E, cfg.block_m), top_k=k, config=cfg, scheme=sch,
                    a_scale=a_scale, w_scale=w_scale, block=block)
    j = torch.arange(T * k)
    ref = torch.einsum("jk,jnk->jn", a_ref[j // k], w_ref[ids.view(-1).long()])
    c = c.cpu().float()
    assert torch.equal(torch.isfinite(c), torch.isfinite(ref)), "non-finite elsewhere than the reference"
    if DEVICE == "cpu":  # the interpreter is exact; an MMA may turn the reference's NaN (inf · 0) into inf
        assert torch.equal(c.isnan(), ref.isnan()) and torch.equal(c.isinf(), ref.isinf())
    assert c[j // k == 1].isnan().all() and not torch.isfinite(c[j // k == 2]).any()
    assert c[ids.view(-1) == 0][:, 3].isnan().all()
    fin = torch.isfinite(ref)
    assert fin.float().mean() > 0.3
    torch.testing.assert_close(c[fin], ref[fin], atol=2e-2, rtol=1e-2)


def _tie_free_logits(T: int, E: int) -> torch.Tensor:
    perm = torch.argsort(torch.rand(T, E), dim=1).float()
    return (perm - E // 2) * (8.0 / E)


def _both(logits, k, scoring, G, kG, bias, renorm=True):
    """(ids, weights) of the kernel and the reference; asserts they agree."""
    w, ids = routing.topk_route(logits.to(DEVICE), k, renorm, scoring, G, kG, bias.to(DEVICE), 1.0)
    rw, rids = ref_topk_route(logits, k, renorm, scoring, G, kG, bias, 1.0)
    torch.testing.assert_close(ids.cpu(), rids, rtol=0, atol=0)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(w).all()
    return rids, rw


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("G,kG", [(0, 0), (4, 2)], ids=["plain", "grouped"])
def test_topk_route_non_finite_bias_never_prefers_nan(scoring, G, kG):
    E, T, k = 16, 9, 4
    logits = _tie_free_logits(T, E)
    bias = torch.randn(E) * 0.05
    bias[[1, 6]] = NAN  # groups 0 and 1 (of 4 experts each)
    bias[3] = INF  # group 0: its top-two sum is inf, it always stays
    bias[9] = -INF
    ids, _ = _both(logits, k, scoring, G, kG, bias)
    assert not torch.isin(ids, torch.tensor([1, 6, 9])).any(), "a NaN / -inf bias made an expert preferred"
    assert (ids[:, 0] == 3).all(), "the +inf bias must win every token"


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_route_group_of_inf_and_minus_inf_is_not_preferred(scoring):
    """Group 0 = {+inf, -inf}: its top-two sum is NaN and counts as -inf; group 1 = {NaN, NaN} is -inf too."""
    E, T, k, G, kG = 8, 5, 2, 4, 2
    bias = torch.zeros(E)
    bias[0], bias[1], bias[2], bias[3] = INF, -INF, NAN, NAN
    ids, _ = _both(_tie_free_logits(T, E), k, scoring, G, kG, bias)
    assert (ids >= 4).all()


@pytest.mark.parametrize("G,kG", [(0, 0), (4, 2)], ids=["plain", "grouped"])
def test_topk_route_all_nan_bias_ties_to_the_lowest_ids(G, kG):
    """Every selection score -inf: ties go to the lowest ids; weights still come from the unbiased scores."""
    E, T, k = 16, 4, 3
    logits = _tie_free_logits(T, E)
    ids, w = _both(logits, k, "sigmoid", G, kG, torch.full((E,), NAN), renorm=False)
    assert (ids == torch.arange(k)).all()
    torch.testing.assert_close(w, torch.sigmoid(logits[:, :k]), rtol=1e-6, atol=1e-6)


def test_moe_sum_nan_slot_poisons_its_token_only_and_dropped_slots_are_not_read():
    T, k, H, E = 5, 3, 40, 4
    x = torch.randn(T, k, H)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    ids[2, 1] = E  # dropped pair: its row is never written by GEMM2 (here: poisoned) and must not be read
    x[2, 1] = NAN
    x[1, 0, 7] = NAN
    x[3, 2, 9] = INF
    out = sum_kernels.moe_sum(x.to(DEVICE), topk_ids=ids.to(DEVICE), num_experts=E).cpu()
    kept = x.clone()
    kept[2, 1] = 0
    torch.testing.assert_close(out, ref_moe_sum(kept), rtol=1e-6, atol=1e-6, equal_nan=True)
    assert out[1, 7].isnan() and out[3, 9] == INF
    assert out[1].isnan().sum() == 1 and torch.isfinite(out[[0, 2, 4]]).all()
    plain = sum_kernels.moe_sum(x.to(DEVICE)).cpu()  # without ids every slot counts
    assert plain[2].isnan().all()
