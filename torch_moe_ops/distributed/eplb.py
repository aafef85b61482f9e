"""EPLB ``rebalance`` (docs/design.md §5): move expert rows between physical slots and ranks.

The caller hands in its tensors (each ``[num_local, ...]``, one row per local slot) and its placement
tables; rows and tables are filled in place, so every ``data_ptr`` is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ParallelConfig
from .placement import physical_to_logical_from_table, tables_from_physical_to_logical


@dataclass(frozen=True)
class EplbTables:
    """A layer's EPLB tables (its buffers): physical_to_logical [E_g] int64, logical_to_physical
    [E_log, R + 1] int32 padded -1, replica_count [E_log] int32, expert_owner [E_g] int64 (read only)."""

    physical_to_logical: torch.Tensor
    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor
    expert_owner: torch.Tensor


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 view (gloo has no fp8; bytes move any dtype)."""
    return t.contiguous().view(torch.uint8)


@torch.no_grad()
def rebalance(tensors: list[torch.Tensor], new_logical_to_physical, tables: EplbTables, pc: ParallelConfig,
              local_slots: tuple[int, ...]) -> None:
    """Make physical slot ``p`` hold the logical expert ``new_logical_to_physical`` ([E_log, max_replicas],
    -1 padded) assigns to it, in every tensor of ``tensors``; then rewrite ``tables``. Collective: every rank
    of ``pc.group`` calls it with the same table and the same list of tensors (same dtypes and shapes).

    local_slots: ``[E_g]`` physical slot -> row of ``tensors`` on this rank, -1 for another rank's."""
    E_log, E_g = tables.logical_to_physical.shape[0], tables.physical_to_logical.shape[0]
    new_p2l = physical_to_logical_from_table(new_logical_to_physical, E_g)
    l2p, count = tables_from_physical_to_logical(new_p2l, E_log)
    if l2p.shape[1] > tables.logical_to_physical.shape[1]:
        raise ValueError(f"rebalance: a logical expert has {l2p.shape[1]} replicas, more than 1 + "
                         f"num_redundant_experts = {tables.logical_to_physical.shape[1]}")
    old_p2l = tables.physical_to_logical.cpu().tolist()  # host-ok: rebalance is a host-driven weight move
    new_list = new_p2l.tolist()  # host-ok: rebalance
    owner = tables.expert_owner.cpu().tolist()  # host-ok: rebalance
    local, me, group, n = local_slots, pc.ep_rank, pc.group, len(tensors)

    def group_rank(ep_rank):
        r = ep_rank * pc.tp_size + pc.tp_rank  # moves stay within one TP slice
        return r if group is None else dist.get_global_rank(group, r)

    # plan (identical on every rank): new slot p <- old slot s holding the same logical expert,
    # preferring one already on p's rank
    incoming, reqs = {}, []
    for p, l in enumerate(new_list):
        if old_p2l[p] == l:
            continue
        sources = [s for s, ol in enumerate(old_p2l) if ol == l]
        same = [s for s in sources if owner[s] == owner[p]]
        s = (same or sources)[0]
        src, dst = owner[s], owner[p]
        if dst == me:
            if src == me:
                incoming[p] = [t[local[s] : local[s] + 1].clone() for t in tensors]
            else:
                bufs = [torch.empty_like(t[local[p] : local[p] + 1]) for t in tensors]
                for i, b in enumerate(bufs):
                    reqs.append(dist.irecv(_bytes(b), src=group_rank(src), group=group, tag=p * n + i))
                incoming[p] = bufs
        elif src == me:
            for i, t in enumerate(tensors):
                reqs.append(dist.isend(_bytes(t[local[s] : local[s] + 1]), dst=group_rank(dst), group=group,
                                       tag=p * n + i))
    for r in reqs:
        r.wait()
    for p, bufs in incoming.items():
        for t, b in zip(tensors, bufs):
            t[local[p] : local[p] + 1].copy_(b)  # in place: data_ptr unchanged
    tables.physical_to_logical.copy_(new_p2l.to(tables.physical_to_logical.device))
    tables.logical_to_physical.fill_(-1)
    tables.logical_to_physical[:, : l2p.shape[1]] = l2p.to(tables.logical_to_physical.device)
    tables.replica_count.copy_(count.to(tables.replica_count.device))
