"""``FusedMoE`` under tensor / expert parallelism (docs/design.md §5, docs/distributed.md): its placement tables
as buffers, the logical -> physical lookup that loading uses, and EPLB's rebalance.

Functions of the ``LayerSpec`` (its ``placement``, this rank's part of the layer) and of the layer's
``_parameters`` / ``_buffers``; ``distributed/`` does the work. The parallel forward stays in the module
(``FusedMoE._parallel_experts``: a forward path reads its tensors as attributes, which Dynamo guards on).

Buffers (non-persistent: never in a checkpoint): ``expert_map`` [E_physical] int32 (None without EP: every id
is local), ``physical_to_logical`` [E_physical], ``logical_to_physical`` [E, R + 1] (-1 padded),
``replica_count`` [E], ``expert_owner`` [E_physical] and ``expert_load`` [E_physical] int64 (the (token, slot)
pairs routed from this rank's tokens to each physical expert since the last reset).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .spec import LayerSpec

#: moved by EPLB rebalance, one row per local slot
PER_EXPERT = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias")


def initial_tables(spec: LayerSpec) -> dict[str, torch.Tensor | None]:
    """The placement tables at construction, built on the host (also under ``torch.device("meta")``)."""
    with torch.device("cpu"):
        return spec.placement.initial_tables()


def make_buffers(spec: LayerSpec, dev: torch.device) -> dict[str, torch.Tensor | None]:
    """The layer's buffers in registration order: ``expert_map`` None without a placement, else the tables and
    ``expert_load``."""
    if spec.placement is None:
        return {"expert_map": None}
    out = {name: None if t is None else t.to(dev) for name, t in initial_tables(spec).items()}
    out["expert_load"] = torch.zeros(spec.num_physical_experts, dtype=torch.int64, device=dev)
    return out


@torch.no_grad()
def reset_buffers(spec: LayerSpec, buffers: Mapping) -> None:
    """The tables as at construction and ``expert_load`` zero, in place (collective in spirit: every rank
    resets)."""
    if spec.placement is None:
        return
    for name, table in initial_tables(spec).items():
        if table is not None:
            buffers[name].copy_(table)
    buffers["expert_load"].zero_()


def physical_ids(spec: LayerSpec, buffers: Mapping, logical_id: int, where: Callable[[], str]) -> list[int]:
    """Global physical slots that hold logical expert ``logical_id`` (``[logical_id]`` without a placement)."""
    if spec.parallel is None:
        return [logical_id]
    if not isinstance(logical_id, int) or not 0 <= logical_id < spec.num_experts:
        raise ValueError(f"{where()}: logical expert id must be an int in [0, {spec.num_experts}), got {logical_id!r}")
    return [p for p in buffers["logical_to_physical"][logical_id].tolist() if p >= 0]  # host-ok: loading-time lookup


def rebalance(spec: LayerSpec, params: Mapping, buffers: Mapping, new_logical_to_physical,
              where: Callable[[], str]) -> None:
    """EPLB (``FusedMoE.rebalance``): move every per-expert parameter's rows to the slots of
    ``new_logical_to_physical`` [E, max_replicas] (-1 padded), update the tables and reset ``expert_load``."""
    if spec.parallel is None:
        raise RuntimeError(f"{where()}: rebalance needs parallel=ParallelConfig(...)")
    from ..distributed import eplb  # imports torch.distributed

    moved = [params[n] for n in PER_EXPERT if params.get(n) is not None]
    tables = eplb.EplbTables(buffers["physical_to_logical"], buffers["logical_to_physical"], buffers["replica_count"],
                             buffers["expert_owner"])
    eplb.rebalance(moved, new_logical_to_physical, tables, spec.parallel, spec.placement.local_slots)
    buffers["expert_load"].zero_()


__all__ = ["PER_EXPERT", "initial_tables", "make_buffers", "physical_ids", "rebalance", "reset_buffers"]
