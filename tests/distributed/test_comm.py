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
