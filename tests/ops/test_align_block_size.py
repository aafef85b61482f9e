"""``moe::align_block_size`` against the pair-by-pair oracle (docs/design.md §7): static sizes, set equality per expert,
sentinel padding, counts and expert_ids exact, deterministic."""
import pytest
import torch

from . import oracle
import torch_moe_ops

from ._data import random_expert_map, random_ids

CASES = [  # T, k, E, B, experts routed to (None: all)
    pytest.param(1, 1, 8, 16, None, id="E8-k1-T1-B16"),
    pytest.param(3, 2, 32, 32, None, id="E32-k2-T3-B32"),
    pytest.param(7, 6, 60, 16, None, id="E60-k6-T7-B16"),
    pytest.param(64, 8, 128, 64, None, id="E128-k8-T64-B64"),
    pytest.param(256, 2, 160, 32, None, id="E160-k2-T256-B32"),
    pytest.param(333, 6, 60, 128, None, id="E60-k6-T333-B128"),
    pytest.param(333, 16, 257, 32, None, id="E257-k16-T333-B32"),
    pytest.param(64, 2, 60, 16, "subset", id="E60-k2-T64-B16-empty-experts"),
    pytest.param(333, 1, 8, 16, "one", id="E8-k1-T333-B16-one-expert"),
    pytest.param(64, 2, 128, 64, "two", id="E128-k2-T64-B64-two-experts"),
    pytest.param(0, 2, 8, 16, None, id="E8-k2-T0-B16"),
]


def _ids(T, k, E, mode):
    if mode is None:
        return random_ids(T, k, E)
    if mode == "subset":
        return random_ids(T, k, E, experts=torch.randperm(E)[: E // 3])
    if mode == "one":
        return torch.full((T, k), E - 1, dtype=torch.int32)
    return random_ids(T, k, E, experts=[5, 77])


@pytest.mark.parametrize("T,k,E,B,mode", CASES)
def test_align(T, k, E, B, mode):
    topk_ids = _ids(T, k, E, mode)
    with torch.inference_mode():
        out = torch_moe_ops.align_block_size(topk_ids, E, B)
        again = torch_moe_ops.align_block_size(topk_ids, E, B)
    oracle.check_alignment(*out, topk_ids, E, B)
    for a, b in zip(out, again):
        assert torch.equal(a, b), "alignment must be deterministic run to run"


@pytest.mark.parametrize("T,k,E_global,E_local,B", [
    pytest.param(7, 2, 16, 8, 16, id="Eg16-El8-k2-T7-B16"),
    pytest.param(333, 6, 60, 30, 32, id="Eg60-El30-k6-T333-B32"),
    pytest.param(64, 8, 128, 64, 64, id="Eg128-El64-k8-T64-B64"),
])
def test_align_expert_map(T, k, E_global, E_local, B):
    """Non-local pairs are dropped; expert_ids hold local ids."""
    topk_ids = random_ids(T, k, E_global)
    emap = random_expert_map(E_global, E_local)
    with torch.inference_mode():
        out = torch_moe_ops.align_block_size(topk_ids, E_global, B, expert_map=emap)
    oracle.check_alignment(*out, topk_ids, E_global, B, emap)
    assert int(out[1].max()) < E_local


def test_align_no_local_pairs():
    topk_ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    emap = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    sorted_ids, expert_ids, npp = torch_moe_ops.align_block_size(topk_ids, 4, 8, expert_map=emap)
    assert npp.tolist() == [0] and (expert_ids == -1).all() and (sorted_ids == 4).all()


def test_align_int64_ids():
    topk_ids = random_ids(33, 2, 60, dtype=torch.int64)
    out = torch_moe_ops.align_block_size(topk_ids, 60, 16)
    oracle.check_alignment(*out, topk_ids, 60, 16)


def test_align_docstring_example():
    ids = torch.tensor([[1], [0], [1]], dtype=torch.int32)
    sorted_ids, expert_ids, npp = torch_moe_ops.align_block_size(ids, 2, 2)
    assert sorted(sorted_ids.tolist()[:2]) == [1, 3] and sorted(sorted_ids.tolist()[2:4]) == [0, 2]
    assert sorted_ids.tolist()[4] == 3 and expert_ids.tolist() == [0, 1, -1] and npp.tolist() == [4]


def test_oracle_rejects_a_wrong_alignment():
    """The checker can fail: swap two pairs of different experts."""
    ids = torch.tensor([[0], [1], [0], [1]], dtype=torch.int32)
    s, e, n = torch_moe_ops.align_block_size(ids, 2, 2)
    bad = s.clone()
    bad[[0, 2]] = s[[2, 0]]
    with pytest.raises(AssertionError):
        oracle.check_alignment(bad, e, n, ids, 2, 2)
