"""``distributed.plan`` is plain data (docs/design.md §5, §14): the placement of a ``ParallelConfig`` and its
initial tables, computed without a process group."""
import pytest

from torch_moe_ops import ParallelConfig
from torch_moe_ops.distributed import plan


def test_plan_is_plain_data():
    pc = ParallelConfig(ep_size=4, ep_rank=1, num_redundant_experts=2)
    p = plan(pc, 6, 128)  # pure: no process group needed
    assert (p.num_physical, p.num_local, p.local_range, p.intermediate) == (8, 2, (2, 4), 128)
    assert p.local_slots == (-1, -1, 0, 1, -1, -1, -1, -1)
    t = p.initial_tables()
    assert t["expert_map"].tolist() == [-1, -1, 0, 1, -1, -1, -1, -1]
    assert t["physical_to_logical"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert t["logical_to_physical"].tolist() == [[0, 6, -1], [1, 7, -1], [2, -1, -1], [3, -1, -1], [4, -1, -1],
                                                 [5, -1, -1]]
    assert t["replica_count"].tolist() == [2, 2, 1, 1, 1, 1] and t["expert_owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan(ParallelConfig(tp_size=2, tp_rank=1), 6, 128).initial_tables()["expert_map"] is None
    with pytest.raises(ValueError, match="not divisible by tp_size"):
        plan(ParallelConfig(tp_size=2, tp_rank=0), 6, 127)
