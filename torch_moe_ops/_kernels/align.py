"""Token alignment (docs/design.md §7): group (token, slot) pairs by local expert, pad each run to the block size.

Layout (``E`` experts, block size ``B``, ``numel = T*k``, ``EB = next_pow2(E + 1)`` histogram bins; bin
``E`` collects dropped pairs: non-local under ``expert_map``, or ids outside ``[0, E)``)::

    sorted_ids [numel + E*(B-1)] int32   expert 0's pairs (ascending j), sentinel numel up to a multiple
                                         of B, expert 1's pairs, ...; the unused tail is numel too
    expert_ids [cdiv(len(sorted_ids), B)] int32   local expert of each block; -1 for unused blocks
    num_post_pad [1] int32                sum of the padded run lengths

Algorithm (deterministic, no atomics, no host sync, static sizes). The pairs are cut into ``nprog``
contiguous chunks of ``per_prog`` pairs; program p of ``_align_scatter_kernel`` owns chunk p and a
share of the blocks. It needs, per expert, the total count and the count in chunks before p:

- small inputs (``numel <= _FUSED_MAX``, one launch): every program re-reads all pairs and builds both
  histograms itself (``FUSED``);
- large inputs: ``_align_count_kernel`` writes per-chunk histograms ``counts[e, p]`` and
  ``_align_scan_kernel`` (one program per expert) turns each row into an exclusive prefix + total.

The scatter program then computes the padded run starts (a cumsum over EB bins), writes expert_ids and
the sentinels of its blocks (the expert of a block is a binary search over the run ends), and stores its
pairs tile by tile: a pair's slot is ``start[e] + (pairs of e in earlier chunks and tiles) + (pairs of
e in earlier lanes of the tile)``, the last term from one ``[TILE, TILE]`` compare-and-count. Per-expert
running slots live in a small global scratch row (L1-resident; no register gathers). Sentinel slots and
pair slots are disjoint, so programs never race.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import token_bucket
from .plan import launch

_TILE = 32  # pairs per scatter tile: the in-tile rank is one [TILE, TILE] compare-and-count (H100: 32 beat 64/128)
_COUNT_TILE = 256  # pairs per histogram step; chunks are multiples of it
_TARGET_PROGS = 1024  # multi-program path: about this many chunks (columns of the counts buffer)
_FUSED_MAX = 4096  # numel up to which each program re-reads all pairs instead of count + scan kernels
_FUSED_PROGS = 32  # most programs on the fused path (they split the sentinel fill and the pairs)
_SLOTS_PER_ITER = 4096  # sorted_ids slots (NB blocks of B) handled per iteration of the block loop


@triton.jit
def _local_ids(ids_ptr, map_ptr, j, mask, E: tl.constexpr, HAS_MAP: tl.constexpr):
    """[TILE] pair indices -> [TILE] int32 local expert ids in [0, E]; E = dropped / out of range / masked."""
    raw = tl.load(ids_ptr + j, mask=mask, other=-1)
    valid = mask & (raw >= 0) & (raw < E)  # range check in the ids' own dtype (int64 ids stay safe)
    e = tl.where(valid, raw, 0).to(tl.int32)
    if HAS_MAP:
        loc = tl.load(map_ptr + e, mask=valid, other=-1).to(tl.int32)
        valid = valid & (loc >= 0) & (loc < E)
        e = loc
    return tl.where(valid, e, E)


@triton.jit
def _histograms(ids_ptr, map_ptr, lo, hi, split, numel,
                E: tl.constexpr, EB: tl.constexpr, TILE: tl.constexpr, HAS_MAP: tl.constexpr):
    """Histograms [EB] of the local ids of pairs [lo, hi): all of them, and those before ``split``."""
    total = tl.zeros([EB], dtype=tl.int32)
    before = tl.zeros([EB], dtype=tl.int32)
    lanes = tl.arange(0, TILE)
    for off in range(lo, hi, TILE):
        j = off + lanes
        e = _local_ids(ids_ptr, map_ptr, j, (j < numel) & (j < hi), E, HAS_MAP)
        total += tl.histogram(e, EB)
        before += tl.histogram(tl.where(j < split, e, E), EB)
    return total, before


@triton.jit(do_not_specialize=["numel", "per_prog", "nprog"])
def _align_count_kernel(ids_ptr, map_ptr, counts_ptr, numel, per_prog, nprog,
                        E: tl.constexpr, EB: tl.constexpr, TILE: tl.constexpr, HAS_MAP: tl.constexpr):
    """ids: [numel] int32/int64 -> counts: [E, nprog] int32, column p = histogram of chunk p."""
    pid = tl.program_id(0)
    lo = pid * per_prog
    hist, _ = _histograms(ids_ptr, map_ptr, lo, lo + per_prog, lo, numel, E, EB, TILE, HAS_MAP)
    bins = tl.arange(0, EB)
    tl.store(counts_ptr + bins * nprog + pid, hist, mask=bins < E)


@triton.jit(do_not_specialize=["nprog"])
def _align_scan_kernel(counts_ptr, totals_ptr, nprog, BP: tl.constexpr):
    """counts: [E, nprog] int32 -> in place exclusive prefix along each row; totals: [E] row sums."""
    row = counts_ptr + tl.program_id(0).to(tl.int64) * nprog
    carry = tl.zeros([], dtype=tl.int32)
    for p0 in range(0, nprog, BP):
        offs = p0 + tl.arange(0, BP)
        c = tl.load(row + offs, mask=offs < nprog, other=0)
        tl.store(row + offs, tl.cumsum(c, axis=0) - c + carry, mask=offs < nprog)
        carry += tl.sum(c, axis=0)
    tl.store(totals_ptr + tl.program_id(0), carry)


@triton.jit(do_not_specialize=["numel", "per_prog", "nprog", "blocks_per_prog", "max_blocks", "max_padded"])
def _align_scatter_kernel(
    ids_ptr, map_ptr, counts_ptr, totals_ptr, scratch_ptr, sorted_ptr, expert_ids_ptr, npp_ptr,
    numel, per_prog, nprog, blocks_per_prog, max_blocks, max_padded,
    E: tl.constexpr, EB: tl.constexpr, B: tl.constexpr, B_P2: tl.constexpr, NB: tl.constexpr,
    TILE: tl.constexpr, COUNT_TILE: tl.constexpr, LOG_EB: tl.constexpr, FUSED: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Writes sorted_ids [max_padded], expert_ids [max_blocks], num_post_pad [1] (see the module doc).
    scratch: [nprog, 3, EB] int32 (per program: running slot, run end, end of real slots per expert)."""
    pid = tl.program_id(0)
    bins = tl.arange(0, EB)
    real = bins < E
    start = pid * per_prog
    if FUSED:
        totals, prior = _histograms(ids_ptr, map_ptr, 0, numel, start, numel, E, EB, COUNT_TILE, HAS_MAP)
    else:
        totals = tl.load(totals_ptr + bins, mask=real, other=0)
        prior = tl.load(counts_ptr + bins * nprog + pid, mask=real, other=0)
    _align_program(ids_ptr, map_ptr, scratch_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, totals, prior, pid, start,
                   numel, per_prog, blocks_per_prog, max_blocks, max_padded, E, EB, B, B_P2, NB, TILE, LOG_EB, HAS_MAP)


@triton.jit
def _align_program(ids_ptr, map_ptr, scratch_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, totals, prior, pid, start,
                   numel, per_prog, blocks_per_prog, max_blocks, max_padded,
                   E: tl.constexpr, EB: tl.constexpr, B: tl.constexpr, B_P2: tl.constexpr, NB: tl.constexpr,
                   TILE: tl.constexpr, LOG_EB: tl.constexpr, HAS_MAP: tl.constexpr):
    """Program ``pid``'s share of the alignment, given per expert [EB] its pair count ``totals`` and the count
    ``prior`` in chunks before its own (pairs [start, start + per_prog)): the runs, num_post_pad (pid 0), the
    metadata and sentinels of its blocks, its pairs. Also the routing kernel's whole alignment when one program
    routes every token (``routing._topk_route_kernel`` ALIGN: pid 0, one chunk)."""
    bins = tl.arange(0, EB)
    real = bins < E
    padded = tl.where(real, (totals + B - 1) // B * B, 0)
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    row = scratch_ptr + pid.to(tl.int64) * (3 * EB)
    tl.store(row + bins, starts + prior)
    tl.store(row + EB + bins, ends)
    tl.store(row + 2 * EB + bins, tl.where(real, starts + totals, 0))  # e == E (tail) -> 0
    if pid == 0:
        tl.store(npp_ptr, tl.sum(padded, axis=0))
    tl.debug_barrier()  # the scratch row is read back below by other threads of this program

    # Block metadata and sentinels for this program's share of blocks.
    b_lo = pid * blocks_per_prog
    b_hi = tl.minimum(b_lo + blocks_per_prog, max_blocks)
    for b0 in range(b_lo, b_hi, NB):
        blocks = b0 + tl.arange(0, NB)
        mask_b = blocks < b_hi
        bstart = blocks * B
        # e = #experts whose padded run ends at or before bstart (binary search; ends is nondecreasing).
        e = tl.zeros([NB], dtype=tl.int32)
        for s in tl.static_range(LOG_EB - 1, -1, -1):
            cand = e + (1 << s)
            end = tl.load(row + EB + tl.minimum(cand - 1, EB - 1))
            e = tl.where((cand <= E) & (end <= bstart), cand, e)
        tl.store(expert_ids_ptr + blocks, tl.where(e < E, e, -1), mask=mask_b)
        fill_end = tl.load(row + 2 * EB + e)  # slots at or past it in the block are padding
        slots = bstart[:, None] + tl.arange(0, B_P2)[None, :]
        mask_s = (mask_b[:, None] & (tl.arange(0, B_P2)[None, :] < B) & (slots >= fill_end[:, None])
                  & (slots < max_padded))
        tl.store(sorted_ptr + slots, tl.zeros([NB, B_P2], dtype=tl.int32) + numel, mask=mask_s)

    # Scatter this chunk's pairs, tile by tile (ascending j inside each expert).
    lanes = tl.arange(0, TILE)
    for off in range(0, per_prog, TILE):
        j = start + off + lanes
        # _local_ids written out: torch.compile's mutation analysis takes a store address computed from a
        # @triton.jit call's result for a write to every pointer given to the call (ids would be copied).
        mask = (j < numel) & (off + lanes < per_prog)
        raw = tl.load(ids_ptr + j, mask=mask, other=-1)
        valid = mask & (raw >= 0) & (raw < E)
        e = tl.where(valid, raw, 0).to(tl.int32)
        if HAS_MAP:
            loc = tl.load(map_ptr + e, mask=valid, other=-1).to(tl.int32)
            valid = valid & (loc >= 0) & (loc < E)
            e = loc
        e = tl.where(valid, e, E)
        # One reduction gives both the rank among equal lanes before i (low 16 bits) and their count.
        same = e[:, None] == e[None, :]
        packed = tl.sum(tl.where(same, tl.where(lanes[None, :] < lanes[:, None], 65537, 65536), 0), axis=1)
        rank = packed & 0xFFFF
        valid = e < E
        slot = tl.load(row + e, mask=valid, other=0) + rank
        tl.store(sorted_ptr + slot, j, mask=valid)
        tl.debug_barrier()  # every lane read its expert's running slot before the last lane bumps it
        tl.store(row + e, slot + 1, mask=valid & (rank == (packed >> 16) - 1))
        tl.debug_barrier()


def align_buffers(numel: int, num_experts: int, block_size: int, device) -> tuple:
    """The alignment's outputs for ``numel`` pairs (the module doc's layout): (sorted_ids [numel + E*(B-1)],
    expert_ids [cdiv(., B)], num_post_pad [1]), int32, uninitialized."""
    max_padded = numel + int(num_experts) * (int(block_size) - 1)
    return (torch.empty(max_padded, dtype=torch.int32, device=device),
            torch.empty(triton.cdiv(max_padded, int(block_size)), dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.int32, device=device))


def align_meta(num_experts: int, block_size: int, has_map: bool) -> dict:
    """The alignment's constexprs (``_align_program``'s, and ``_histograms``' COUNT_TILE)."""
    E, B = int(num_experts), int(block_size)
    eb, b_p2 = triton.next_power_of_2(E + 1), triton.next_power_of_2(B)
    return dict(E=E, EB=eb, B=B, B_P2=b_p2, NB=max(1, _SLOTS_PER_ITER // b_p2), TILE=_TILE, COUNT_TILE=_COUNT_TILE,
                LOG_EB=eb.bit_length() - 1, HAS_MAP=has_map)


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids: [T, k] int32/int64 -> (sorted_ids [T*k + E*(B-1)] int32, expert_ids [cdiv(., B)] int32,
    num_post_pad [1] int32), all on topk_ids' device; ``expert_map``: [num_experts] int32 (global -> local,
    -1 = not here) or None. Equals ``reference.align.align_block_size`` exactly. No host sync."""
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    numel = ids.numel()
    E, B = int(num_experts), int(block_size)
    sorted_ids, expert_ids, num_post_pad = align_buffers(numel, E, B, dev)
    max_padded, max_blocks = sorted_ids.shape[0], expert_ids.shape[0]
    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    meta = dict(align_meta(E, B, has_map), num_warps=4)
    eb = meta["EB"]
    # The path is chosen per token bucket (configs.token_bucket), so a graph traced for a symbolic T takes
    # the path eager takes for every T it accepts; sym_min / sym_max keep the sizes symbolic (no guard).
    fused = token_bucket(topk_ids.shape[0]) * topk_ids.shape[1] <= _FUSED_MAX
    if fused:
        nprog = torch.sym_max(1, torch.sym_min(_FUSED_PROGS, triton.cdiv(max_blocks, 8)))  # splits the sentinel fill
        per_prog = triton.cdiv(triton.cdiv(torch.sym_max(numel, 1), nprog), _TILE) * _TILE
        counts = totals = ids  # unused (never a buffer the kernel writes: no aliasing for torch.compile)
    else:
        per_prog = triton.cdiv(triton.cdiv(numel, _TARGET_PROGS), _COUNT_TILE) * _COUNT_TILE
        nprog = triton.cdiv(numel, per_prog)
        counts = torch.empty((E, nprog), dtype=torch.int32, device=dev)
        totals = torch.empty(E, dtype=torch.int32, device=dev)
        launch(_align_count_kernel, (nprog,), ids, emap, counts, numel, per_prog, nprog, E=E, EB=eb, TILE=_COUNT_TILE,
                                      HAS_MAP=has_map, num_warps=4)
        launch(_align_scan_kernel, (E,), counts, totals, nprog, BP=1024, num_warps=4)
    scratch = torch.empty((nprog, 3, eb), dtype=torch.int32, device=dev)
    launch(_align_scatter_kernel, (nprog,),
        ids, emap, counts, totals, scratch, sorted_ids, expert_ids, num_post_pad,
        numel, per_prog, nprog, triton.cdiv(max_blocks, nprog), max_blocks, max_padded, FUSED=fused, **meta,
    )
    return sorted_ids, expert_ids, num_post_pad
