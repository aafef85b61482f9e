"""Placement of one layer's experts on this rank (docs/design.md §5): ``plan(pc, E, I) -> Placement``.

``Placement`` is plain data; the layer registers the tables ``initial_tables()`` returns as its own
buffers and hands them back to ``comm`` / ``eplb`` when it calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import placement as P
from .config import ParallelConfig


@dataclass(frozen=True)
class Placement:
    """Where one layer's experts and its I slice live on this rank.

    num_logical: E_log (the router's width). num_redundant: R, EPLB replicas. local_range: ``[start, end)``
    of the global physical slots this rank holds. local_slots: ``[E_g]`` physical slot -> local slot, -1 for
    another rank's. intermediate: this rank's I (``intermediate_full / tp_size``)."""

    num_logical: int
    num_redundant: int
    ep_size: int
    ep_rank: int
    tp_size: int
    tp_rank: int
    local_range: tuple[int, int]
    local_slots: tuple[int, ...]
    intermediate: int
    intermediate_full: int

    @property
    def num_physical(self) -> int:
        return self.num_logical + self.num_redundant

    @property
    def num_local(self) -> int:
        return self.local_range[1] - self.local_range[0]

    def initial_tables(self) -> dict[str, torch.Tensor | None]:
        """The placement tables at construction (host tensors; all int, never loaded from checkpoints):

        expert_map [E_g] int32 physical -> local, -1 elsewhere (None without EP: every id is local);
        physical_to_logical [E_g] int64; logical_to_physical [E_log, R + 1] int32 padded -1 (a fixed shape:
        rebalance writes it in place); replica_count [E_log] int32; expert_owner [E_g] int64 (EP rank)."""
        E_log, R, E_g = self.num_logical, self.num_redundant, self.num_physical
        p2l = P.initial_physical_to_logical(E_log, R)
        l2p, count = P.tables_from_physical_to_logical(p2l, E_log)
        padded = torch.full((E_log, R + 1), -1, dtype=torch.int32)
        padded[:, : l2p.shape[1]] = l2p
        return {
            # other ranks' ids are -1 in expert_map, so fused_experts adds exactly zero for them
            "expert_map": P.expert_map(E_g, self.ep_size, self.ep_rank) if self.ep_size > 1 else None,
            "physical_to_logical": p2l,
            "logical_to_physical": padded,
            "replica_count": count,
            "expert_owner": P.owner_of(E_g, self.ep_size),
        }


def plan(pc: ParallelConfig, num_experts: int, intermediate_size: int) -> Placement:
    """Validate ``pc`` against the layer's sizes (E logical experts, the checkpoint's I) and place it.

    Pure: it does not look at the process group (``pc.check_group()`` does) and raises ``ValueError`` on
    every rank alike, before any collective."""
    if not isinstance(pc, ParallelConfig):
        raise TypeError(f"parallel must be a torch_moe_ops.ParallelConfig, got {type(pc).__name__}")
    E_log, R, ep, tp = num_experts, pc.num_redundant_experts, pc.ep_size, pc.tp_size
    E_g = E_log + R
    where = f"FusedMoE(E={E_log}, I={intermediate_size}, tp={tp}, ep={ep}, redundant={R})"
    if R and E_g % ep:
        raise ValueError(f"{where}: EPLB needs (num_experts + num_redundant_experts) % ep_size == 0, got {E_g} % {ep}")
    if E_g < ep:
        raise ValueError(f"{where}: {E_g} physical experts cannot be spread over ep_size={ep} ranks "
                         "(each rank needs one)")
    if intermediate_size % tp:
        raise ValueError(f"{where}: intermediate_size {intermediate_size} is not divisible by tp_size {tp}")
    start, end = P.linear_ranges(E_g, ep)[pc.ep_rank]
    slots = [-1] * E_g
    slots[start:end] = range(end - start)
    return Placement(num_logical=E_log, num_redundant=R, ep_size=ep, ep_rank=pc.ep_rank, tp_size=tp,
                     tp_rank=pc.tp_rank, local_range=(start, end), local_slots=tuple(slots),
                     intermediate=intermediate_size // tp, intermediate_full=intermediate_size)
