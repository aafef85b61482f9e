"""The distributed forward around a layer's experts (TP all-reduce, EP all-to-all, EP all-gather /
reduce-scatter): tensors and plain placement data in, tensors out.

The caller runs its own experts through ``run_experts(x [N, H], topk_weights [N, k] fp32, topk_ids [N, k]
int32 physical ids) -> [N, H]`` (its local experts and I slice; pairs routed to other ranks' experts add
exactly 0). Every collective is a traceable functional collective
(``torch.distributed._functional_collectives``), so the TP and all-gather paths compile with
``torch.compile(fullgraph=True)``. The all-to-all path needs the per-rank pair counts on the host for
``all_to_all_single``'s split sizes: that ``.tolist()`` of the exchanged count tensor is its only host
synchronisation.

Batch-invariant mode (``invariant``; docs/batch-invariance.md): no collective sums. NCCL picks its reduction
algorithm (ring, tree; and with it the order of the ranks' additions) by message size, which grows with T, so
partial outputs are exchanged whole (all-gather, all-to-all) and added here, rank by rank (slot by slot for the
all-to-all's pairs), in fp32: each element's sum has one order whatever the batch. Costs tp (or ep) times the
reduce's receive bytes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .config import ParallelConfig

RunExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _group(pc: ParallelConfig):
    return pc.group if pc.group is not None else dist.group.WORLD


def parallel_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, pc: ParallelConfig,
                     expert_owner: torch.Tensor, run_experts: RunExperts, invariant: bool = False) -> torch.Tensor:
    """x: [T, H]; topk_weights: [T, k] fp32; topk_ids: [T, k] int32 **physical** ids; expert_owner: [E_g]
    int64 EP rank of each physical expert -> [T, H] (this rank's tokens, TP partial sums reduced).
    ``invariant``: sums in a fixed order instead of collective reductions (module docstring)."""
    topk_weights = topk_weights.contiguous()
    if pc.world_size == 1:
        return run_experts(x, topk_weights, topk_ids)
    group = _group(pc)
    if pc.ep_size == 1:  # tensor parallel: same tokens everywhere, partial sums over I
        partial = run_experts(x, topk_weights, topk_ids)
        if invariant:
            return ordered_sum(fc.wait_tensor(fc.all_gather_tensor(partial.contiguous(), 0, group)),
                               pc.world_size, x.dtype)
        return fc.wait_tensor(fc.all_reduce(partial, "sum", group))
    if pc.mode == "all_gather":
        return gather_scatter(x, topk_weights, topk_ids, group, run_experts, pc.world_size if invariant else 0)
    return all_to_all(x, topk_weights, topk_ids, group, pc.ep_size, expert_owner, run_experts, invariant)


def ordered_sum(parts: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """parts: [n·R, ...] (n blocks of R rows, e.g. one per rank) -> their sum [R, ...] in ``dtype``, added in
    fp32 block 0 + block 1 + ... (elementwise adds: one order whatever R)."""
    blocks = parts.view(n, -1, *parts.shape[1:])
    acc = blocks[0].float()
    for i in range(1, n):
        acc = acc + blocks[i].float()
    return acc.to(dtype)


def gather_scatter(x, topk_weights, ids, group, run_experts: RunExperts, ordered: int = 0):
    """All-gather every rank's tokens (activations, router weights, physical ids), run the local experts on
    all of them, reduce-scatter the partial outputs back. Needs the same T on every rank. ``ordered`` (the
    group size, batch-invariant mode): the partials come back by all-to-all and ``ordered_sum`` adds them."""
    xs = fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), 0, group))
    ws = fc.wait_tensor(fc.all_gather_tensor(topk_weights, 0, group))
    ids_all = fc.wait_tensor(fc.all_gather_tensor(ids.contiguous(), 0, group))
    partial = run_experts(xs, ws, ids_all)
    if ordered:  # rank r's rows of every rank's partial, in rank order: [ep·T, H]
        mine = fc.wait_tensor(fc.all_to_all_single(partial.contiguous(), None, None, group))
        return ordered_sum(mine, ordered, x.dtype)
    return fc.wait_tensor(fc.reduce_scatter_tensor(partial, "sum", 0, group))


def all_to_all(x, topk_weights, ids, group, ep: int, expert_owner: torch.Tensor, run_experts: RunExperts,
               invariant: bool = False):
    """Dispatch each (token, slot) pair to the rank owning its physical expert, run it there, send the
    router-weighted result back, and sum a token's k results in fp32 (``invariant``: slot by slot).

    Per pair: H activations (hidden dtype) + expert id (int32) + router weight (fp32) out, H values back.
    Counts: one ``[ep]`` int64 all-to-all on device, then ``.tolist()`` (the host sync the split sizes need).
    """
    T, k = ids.shape
    H = x.shape[1]
    flat = ids.reshape(-1)
    dest = expert_owner[flat.long()]
    order = torch.argsort(dest, stable=True)
    send_counts = torch.zeros(ep, dtype=torch.int64, device=x.device).scatter_add_(0, dest, torch.ones_like(dest))
    recv_counts = fc.wait_tensor(fc.all_to_all_single(send_counts, None, None, group))
    in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()  # host-ok (all_to_all_single needs host split sizes); host sync
    for n in in_splits + out_splits:  # unbacked sizes under torch.compile
        torch._check_is_size(n)
    torch._check(sum(in_splits) == T * k)
    send_x = x[order // k]
    # id and router weight travel together: [N, 2] int32 (the weight's fp32 bits)
    meta = torch.stack([flat[order], topk_weights.reshape(-1)[order].view(torch.int32)], 1)
    recv_x = fc.wait_tensor(fc.all_to_all_single(send_x, out_splits, in_splits, group))
    recv_meta = fc.wait_tensor(fc.all_to_all_single(meta, out_splits, in_splits, group))
    recv_ids = recv_meta[:, 0:1].contiguous()
    recv_w = recv_meta[:, 1:2].contiguous().view(torch.float32)
    y = run_experts(recv_x, recv_w, recv_ids)
    back = fc.wait_tensor(fc.all_to_all_single(y, in_splits, out_splits, group))
    pairs = torch.empty((T * k, H), dtype=torch.float32, device=x.device)
    pairs[order] = back.float()
    if invariant:
        return ordered_sum(pairs.view(T, k, H).transpose(0, 1).reshape(k * T, H), k, x.dtype)
    return pairs.view(T, k, H).sum(1).to(x.dtype)
