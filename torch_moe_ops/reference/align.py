"""Reference token alignment (docs/design.md §7). CPU only: it loops over experts on the host."""
from __future__ import annotations

import torch

from ..schemes import cdiv


def local_expert_ids(topk_ids: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None) -> torch.Tensor:
    """[T, k] ids -> [T*k] int64 local ids; -1 for non-local or out-of-range ids (they contribute nothing)."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    local = expert_map.long()[safe] if expert_map is not None else safe
    return torch.where(valid, local, torch.full_like(local, -1))


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids: [T, k] int -> (sorted_ids [numel + E*(B-1)] int32, expert_ids [max_blocks] int32,
    num_post_pad [1] int32). Pairs grouped by ascending local expert (ascending j inside), each run padded
    to a multiple of B with the sentinel numel = T*k; -1 marks unused blocks; non-local pairs are dropped."""
    numel = topk_ids.numel()
    max_padded = numel + num_experts * (block_size - 1)
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.full((cdiv(max_padded, block_size),), -1, dtype=torch.int32, device=topk_ids.device)
    local = local_expert_ids(topk_ids, num_experts, expert_map)
    pos = 0
    for e in range(num_experts):
        pairs = (local == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        sorted_ids[pos : pos + pairs.numel()] = pairs.to(torch.int32)
        padded = cdiv(pairs.numel(), block_size) * block_size
        expert_ids[pos // block_size : (pos + padded) // block_size] = e
        pos += padded
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=topk_ids.device)
