"""``distributed.comm`` takes tensors and the caller's experts, never a layer (docs/design.md §5, §14): at world
size 1 the parallel forward runs the caller's experts once on the inputs as given."""
import torch

from torch_moe_ops import ParallelConfig
from torch_moe_ops.distributed import comm

E, H = 6, 64


def test_parallel_forward_runs_the_callers_experts():
    """World size 1: the caller's ``run_experts`` runs once on the inputs as given (weights made contiguous)."""
    calls = []

    def run(x, w, ids):
        calls.append((x, w, ids))
        return x * 2

    x, w, ids = torch.randn(5, H), torch.rand(2, 5).t(), torch.zeros(5, 2, dtype=torch.int32)
    out = comm.parallel_forward(x, w, ids, ParallelConfig(), torch.zeros(E, dtype=torch.int64), run)
    assert torch.equal(out, x * 2) and len(calls) == 1
    assert calls[0][0] is x and calls[0][2] is ids and calls[0][1].is_contiguous() and torch.equal(calls[0][1], w)


def test_ordered_sum_adds_blocks_in_order_in_fp32():
    parts = torch.tensor([[1e8], [3.0], [-1e8], [5.0]], dtype=torch.float32)  # 2 blocks of 2 rows
    got = comm.ordered_sum(parts, 2, torch.float32)
    assert got.tolist() == [[(1e8 + -1e8)], [8.0]] and comm.ordered_sum(parts[:0], 2, torch.bfloat16).shape == (0, 1)


def test_replica_hash_by_content_ignores_the_position():
    """Batch-invariant mode picks a token's EPLB replica from its bits: the same token, wherever it sits in
    whatever batch, gets the same physical expert (negative bit sums included)."""
    from torch_moe_ops.distributed.placement import map_logical_to_physical, token_hash

    x = -torch.rand(7, 16).bfloat16()  # negative values: the int16 sums are negative
    h = token_hash(7, "cpu", x)
    assert (h >= 0).all() and torch.equal(token_hash(3, "cpu", x[[4, 0, 6]]), h[[4, 0, 6]])
    l2p = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # 4 logical experts, 2 replicas each
    count = torch.full((4,), 2)
    ids = torch.randint(0, 4, (7, 2))
    full = map_logical_to_physical(ids, l2p, count, x)
    assert torch.equal(map_logical_to_physical(ids[[6, 2]], l2p, count, x[[6, 2]]), full[[6, 2]])
    assert not torch.equal(token_hash(7, "cpu"), h)  # (the default: by position)
