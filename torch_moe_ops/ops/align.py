"""``moe::align_block_size``: group (token, slot) pairs by expert in blocks of B, static sizes (docs/design.md §7)."""
from __future__ import annotations

import torch

from .. import reference
from ..schemes import cdiv
from . import _checks as C
from ._registry import define, use_triton_on_cpu

SCHEMA = (
    "(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_map=None) "
    "-> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_padded)"
)


def check_align(topk_ids, num_experts, block_size, expert_map) -> None:
    C.check_tensor(topk_ids, "topk_ids", dim=2, dtypes=C.INDEX_DTYPES, contiguous=True)
    C.check(num_experts >= 1, f"num_experts must be >= 1, got {num_experts}")
    C.check(block_size >= 1, f"block_size must be >= 1, got {block_size}")
    C.check_pairs(topk_ids.shape[0], topk_ids.shape[1], "topk_ids")
    if expert_map is not None:
        C.check_tensor(expert_map, "expert_map", dim=1, dtypes=(torch.int32,), contiguous=True)
        C.check_shape(expert_map, "expert_map", (num_experts,), " (one entry per global expert)")
        C.check_same_device(topk_ids=topk_ids, expert_map=expert_map)


def aligned_sizes(numel, num_experts: int, block_size: int):
    """Static sizes: (max_padded, max_blocks) for ``numel = T*k`` pairs."""
    max_padded = numel + num_experts * (block_size - 1)
    return max_padded, cdiv(max_padded, block_size)


def align(topk_ids, num_experts, block_size, expert_map, on_triton: bool):
    check_align(topk_ids, num_experts, block_size, expert_map)
    C.check_ids_in_range(topk_ids, "topk_ids", 0, num_experts)
    if on_triton:
        from .._kernels import align as kernels

        return kernels.align_block_size(topk_ids, num_experts, block_size, expert_map)
    return reference.align_block_size(topk_ids, num_experts, block_size, expert_map)


@define("align_block_size", SCHEMA)
def _align_block_size(topk_ids, num_experts, block_size, expert_map=None):
    return align(topk_ids, num_experts, block_size, expert_map, on_triton=True)


@_align_block_size.register_kernel("cpu")
def _align_block_size_cpu(topk_ids, num_experts, block_size, expert_map=None):
    return align(topk_ids, num_experts, block_size, expert_map, on_triton=use_triton_on_cpu())


@_align_block_size.register_fake
def _align_block_size_fake(topk_ids, num_experts, block_size, expert_map=None):
    check_align(topk_ids, num_experts, block_size, expert_map)
    max_padded, max_blocks = aligned_sizes(topk_ids.numel(), num_experts, block_size)
    new = lambda n: topk_ids.new_empty((n,), dtype=torch.int32)  # noqa: E731
    return new(max_padded), new(max_blocks), new(1)


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, *, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert into blocks of ``block_size`` rows, with no host sync.

    Args:
        topk_ids: [T, k] int32/int64 global expert ids in [0, num_experts).
        num_experts: global expert count E (with ``expert_map``, its length).
        block_size: B, the GEMM's BLOCK_M.
        expert_map: [E] int32 global -> local id, -1 for experts on other ranks (their pairs are dropped).

    Returns:
        sorted_token_ids: [T*k + E*(B-1)] int32 pair indices j = token*k + slot, grouped by ascending
            local expert (ascending j inside), each run padded to a multiple of B with the sentinel T*k.
            Example (E = 2, B = 2, ids [[1], [0], [1]], sentinel 3): [1, 3, 0, 2, 3].
        expert_ids: [ceil(len(sorted_token_ids) / B)] int32 local expert per block, -1 for unused
            blocks (the example's: [0, 1, -1]).
        num_tokens_post_padded: [1] int32 on the device: the padded length actually used (example: [4]).
    """
    return torch.ops.moe.align_block_size(topk_ids, num_experts, block_size, expert_map)
