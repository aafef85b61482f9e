"""``FusedMoE`` hooks for ``parallel=ParallelConfig(...)``: shard sizes, EP/EPLB buffers, TP narrowing."""
from __future__ import annotations

import torch

from . import placement
from .config import ParallelConfig


def setup_parallel(layer, pc: ParallelConfig, quant_config) -> None:
    """Validate ``pc`` against the layer and the process group; set the local sizes and register the
    placement buffers (all int, never loaded from checkpoints)."""
    if not isinstance(pc, ParallelConfig):
        raise TypeError(f"parallel must be a torch_moe_ops.ParallelConfig, got {type(pc).__name__}")
    if pc.world_size > 1:
        pc.check_group()
    E_log, R, ep, tp = layer.num_experts, pc.num_redundant_experts, pc.ep_size, pc.tp_size
    E_g = E_log + R
    where = f"FusedMoE(E={E_log}, I={layer.intermediate_size_full}, tp={tp}, ep={ep}, redundant={R})"
    if R and E_g % ep:
        raise ValueError(f"{where}: EPLB needs (num_experts + num_redundant_experts) % ep_size == 0, got {E_g} % {ep}")
    if E_g < ep:
        raise ValueError(f"{where}: {E_g} physical experts cannot be spread over ep_size={ep} ranks (each rank needs one)")
    I_full = layer.intermediate_size_full
    if I_full % tp:
        raise ValueError(f"{where}: intermediate_size {I_full} is not divisible by tp_size {tp}")
    I = I_full // tp
    if tp > 1 and quant_config is not None and quant_config.weight_scheme == "fp8_block":
        bn, bk = quant_config.block_shape
        if I % bn or I % bk:
            raise ValueError(f"{where}: fp8_block needs the TP shard I/tp = {I} to be a multiple of the block shape "
                             f"({bn}, {bk}) so that shard boundaries fall on block boundaries")
    layer.intermediate_size = I
    start, end = placement.linear_ranges(E_g, ep)[pc.ep_rank]
    layer.num_local_experts = end - start
    layer.num_physical_experts = E_g
    layer.local_expert_range = (start, end)
    emap = placement.expert_map(E_g, ep, pc.ep_rank)
    layer._local_ids = emap.tolist()  # host-ok (setup, once); host copy for the loader (placement never changes, only contents)
    p2l = placement.initial_physical_to_logical(E_log, R)
    l2p, count = placement.tables_from_physical_to_logical(p2l, E_log)
    padded = torch.full((E_log, R + 1), -1, dtype=torch.int32)  # fixed shape: rebalance writes in place
    padded[:, : l2p.shape[1]] = l2p
    # "nothing local": topk ids of other ranks are -1 in expert_map, so fused_experts contributes exactly zero
    layer.register_buffer("expert_map", emap if ep > 1 else None, persistent=False)
    layer.register_buffer("physical_to_logical", p2l, persistent=False)
    layer.register_buffer("logical_to_physical", padded, persistent=False)
    layer.register_buffer("replica_count", count, persistent=False)
    layer.register_buffer("expert_owner", placement.owner_of(E_g, ep), persistent=False)
    #: per-physical-expert count of (token, slot) pairs routed from this rank's tokens since the last reset
    layer.register_buffer("expert_load", torch.zeros(E_g, dtype=torch.int64), persistent=False)
    dev = torch.device(layer._target_device) if getattr(layer, "_target_device", None) is not None else None
    if dev is not None:
        for n in ("expert_map", "physical_to_logical", "logical_to_physical", "replica_count", "expert_owner",
                  "expert_load"):
            b = getattr(layer, n)
            if b is not None:
                setattr(layer, n, b.to(dev))


def narrow_tp(layer, name: str, t: torch.Tensor, shard: str) -> torch.Tensor:
    """This TP rank's part of a full (checkpoint-shaped, oriented) per-expert tensor (spec §11)."""
    pc = layer.parallel
    I, If, r = layer.intermediate_size, layer.intermediate_size_full, pc.tp_rank
    lo, hi = r * I, (r + 1) * I
    if shard in ("w1", "w3"):
        return t[lo:hi]
    if shard == "w2":
        if name == "w2_bias":  # the all-reduce adds it once: only TP rank 0 holds the real bias
            return t if r == 0 else torch.zeros_like(t)
        return t[:, lo:hi]
    # fused w13 in the layer's row order
    if not layer.gated:
        return t[lo:hi]
    if layer.interleaved:
        return t[2 * lo : 2 * hi]
    return torch.cat([t[lo:hi], t[If + lo : If + hi]], 0)
