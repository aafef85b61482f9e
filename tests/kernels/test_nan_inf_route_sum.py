"""Non-finite values in the router and moe_sum kernels (docs/design.md §4, §8.2), called directly (the ops
layer refuses a non-finite correction bias on CPU; on CUDA it checks only under TORCH_MOE_OPS_DEBUG=1).

A NaN selection score counts as -inf: a NaN bias never makes an expert preferred, +inf + -inf in a group's
top-two sum never makes a group preferred; the Triton kernel and ``reference.topk_route`` choose the same
experts. moe_sum propagates a NaN of a summed slot and never reads a dropped one.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import moe_sum as sum_kernels  # noqa: E402
from torch_moe_ops._kernels import routing  # noqa: E402
from torch_moe_ops.reference import moe_sum as ref_moe_sum  # noqa: E402
from torch_moe_ops.reference.routing import topk_route as ref_topk_route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: NaN/inf arithmetic is the point here (numpy warns about it in the interpreter)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")


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
