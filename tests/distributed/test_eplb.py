"""``distributed.eplb`` takes plain tensors and tables, never a layer (docs/design.md §5, §14): a rebalance in one
process fills the rows and the tables in place."""
import torch

from torch_moe_ops import ParallelConfig
from torch_moe_ops.distributed import eplb, plan, tables_from_physical_to_logical


def test_eplb_takes_tensors_and_tables():
    """``eplb.rebalance`` on plain tensors (no layer): rows and tables are filled in place."""
    E_log, E_g = 3, 4
    pl = plan(ParallelConfig(num_redundant_experts=1), E_log, 8)
    t = pl.initial_tables()
    tables = eplb.EplbTables(t["physical_to_logical"], t["logical_to_physical"], t["replica_count"], t["expert_owner"])
    rows = torch.arange(E_g * 2, dtype=torch.float32).view(E_g, 2)  # row p = the data of logical p2l[p]
    rows[3] = rows[0]
    other = rows.to(torch.int8).clone()
    new_p2l = torch.tensor([2, 0, 1, 2])
    eplb.rebalance([rows, other], tables_from_physical_to_logical(new_p2l, E_log)[0], tables, ParallelConfig(),
                   pl.local_slots)
    assert rows.tolist() == [[4, 5], [0, 1], [2, 3], [4, 5]] and torch.equal(other, rows.to(torch.int8))
    assert tables.physical_to_logical.tolist() == new_p2l.tolist()
    assert tables.logical_to_physical.tolist() == [[1, -1], [2, -1], [0, 3]]
    assert tables.replica_count.tolist() == [1, 1, 2]
