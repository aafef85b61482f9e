"""EPLB ``rebalance``: move expert weights (and scales, biases) between physical slots and ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .placement import physical_to_logical_from_table, tables_from_physical_to_logical

_MOVED = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 view (gloo has no fp8; bytes move any dtype)."""
    return t.contiguous().view(torch.uint8)


@torch.no_grad()
def rebalance(layer, new_logical_to_physical) -> None:
    pc = layer.parallel
    E_log, E_g = layer.num_experts, layer.num_physical_experts
    new_p2l = physical_to_logical_from_table(new_logical_to_physical, E_g)
    l2p, count = tables_from_physical_to_logical(new_p2l, E_log)
    if l2p.shape[1] > layer.logical_to_physical.shape[1]:
        raise ValueError(f"rebalance: a logical expert has {l2p.shape[1]} replicas, more than 1 + "
                         f"num_redundant_experts = {layer.logical_to_physical.shape[1]}")
    old_p2l = layer.physical_to_logical.cpu().tolist()  # host-ok: rebalance is a host-driven weight move
    new_list = new_p2l.tolist()  # host-ok: rebalance
    owner = layer.expert_owner.cpu().tolist()  # host-ok: rebalance
    local = layer._local_ids
    me = pc.ep_rank
    tensors = [getattr(layer, n) for n in _MOVED if getattr(layer, n, None) is not None]
    group = pc.group

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
                    reqs.append(dist.irecv(_bytes(b), src=group_rank(src), group=group,
                                           tag=p * len(_MOVED) + i))
                incoming[p] = bufs
        elif src == me:
            for i, t in enumerate(tensors):
                reqs.append(dist.isend(_bytes(t[local[s] : local[s] + 1]), dst=group_rank(dst), group=group, tag=p * len(_MOVED) + i))
    for r in reqs:
        r.wait()
    for p, bufs in incoming.items():
        for t, b in zip(tensors, bufs):
            t[local[p] : local[p] + 1].copy_(b)  # in place: data_ptr unchanged
    layer.physical_to_logical.copy_(new_p2l.to(layer.physical_to_logical.device))
    layer.logical_to_physical.fill_(-1)
    layer.logical_to_physical[:, : l2p.shape[1]] = l2p.to(layer.logical_to_physical.device)
    layer.replica_count.copy_(count.to(layer.replica_count.device))
    layer.expert_load.zero_()
