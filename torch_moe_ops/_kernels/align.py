"""Token alignment (spec §7): group (token, slot) pairs by local expert, pad each run to the block size.

Layout (``E`` experts, block size ``B``, ``numel = T*k``, ``EB = next_pow2(E + 1)`` histogram bins; bin
``E`` collects dropped pairs: non-local under ``expert_map``, or ids outside ``[0, E)``)::

    sorted_ids [numel + E*(B-1)] int32   expert 0's pairs (ascending j), sentinel numel up to a multiple
                                         of B, expert 1's pairs, ...; the unused tail is numel too
    expert_ids [cdiv(len(sorted_ids), B)] int32   local expert of each block; -1 for unused blocks
    num_post_pad [1] int32                sum of the padded run lengths

Algorithm (deterministic, no atomics, no host sync, static sizes). The pairs are cut into ``nprog``
contiguous chunks of ``per_prog`` pairs (a multiple of ``TILE``):

1. ``_align_count_kernel`` (one program per chunk): histogram of the chunk's local ids -> counts[p, :].
2. ``_align_scan_kernel`` (one program per ``BE`` bins): exclusive prefix over chunks, in place, so
   counts[p, e] = pairs of expert e in chunks before p; totals[e] = pairs of expert e.
3. ``_align_scatter_kernel`` (one program per chunk): every program recomputes the padded expert
   starts from totals (a cumsum over EB bins), writes expert_ids and the sentinels of its share of the
   blocks, then scatters its pairs: a pair's slot is ``start[e] + counts[p, e] + (pairs of e in the
   chunk's earlier tiles) + (pairs of e in earlier lanes of its tile)``, so order follows j.
   Sentinel slots and pair slots are disjoint, so the programs never race.

Small inputs (``numel <= _FUSED_MAX``) run all three phases in one program (``FUSED``): one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 128  # pairs per scatter tile (the rank step is a [TILE, TILE] compare)
_COUNT_TILE = 1024  # pairs per histogram tile in the count kernel; chunks are multiples of it
_FUSED_MAX = 4096  # numel up to which one program does everything
_MAX_PROGS = 1024  # upper bound on chunks (rows of the counts buffer)


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
def _chunk_histogram(ids_ptr, map_ptr, start, per_prog, numel,
                     E: tl.constexpr, EB: tl.constexpr, TILE: tl.constexpr, HAS_MAP: tl.constexpr):
    hist = tl.zeros([EB], dtype=tl.int32)
    lanes = tl.arange(0, TILE)
    for off in range(0, per_prog, TILE):
        j = start + off + lanes
        e = _local_ids(ids_ptr, map_ptr, j, j < numel, E, HAS_MAP)
        hist += tl.histogram(e, EB)
    return hist


@triton.jit(do_not_specialize=["numel", "per_prog"])
def _align_count_kernel(ids_ptr, map_ptr, counts_ptr, numel, per_prog,
                        E: tl.constexpr, EB: tl.constexpr, TILE: tl.constexpr, HAS_MAP: tl.constexpr):
    """ids: [numel] int32/int64 -> counts: [nprog, EB] int32 (per-chunk histogram)."""
    pid = tl.program_id(0)
    hist = _chunk_histogram(ids_ptr, map_ptr, pid * per_prog, per_prog, numel, E, EB, TILE, HAS_MAP)
    tl.store(counts_ptr + pid * EB + tl.arange(0, EB), hist)


@triton.jit(do_not_specialize=["nprog"])
def _align_scan_kernel(counts_ptr, totals_ptr, nprog, EB: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr):
    """counts: [nprog, EB] int32 -> in place exclusive prefix over chunks; totals: [EB] int32 column sums."""
    cols = tl.program_id(0) * BE + tl.arange(0, BE)
    carry = tl.zeros([BE], dtype=tl.int32)
    for p0 in range(0, nprog, BP):
        rows = p0 + tl.arange(0, BP)
        ptrs = counts_ptr + rows[:, None] * EB + cols[None, :]
        mask = rows[:, None] < nprog
        c = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(c, axis=0) - c + carry[None, :], mask=mask)
        carry += tl.sum(c, axis=0)
    tl.store(totals_ptr + cols, carry)


@triton.jit(do_not_specialize=["numel", "per_prog", "blocks_per_prog", "max_blocks", "max_padded"])
def _align_scatter_kernel(
    ids_ptr, map_ptr, counts_ptr, totals_ptr, sorted_ptr, expert_ids_ptr, npp_ptr,
    numel, per_prog, blocks_per_prog, max_blocks, max_padded,
    E: tl.constexpr, EB: tl.constexpr, B: tl.constexpr, B_P2: tl.constexpr, NB: tl.constexpr,
    TILE: tl.constexpr, COUNT_TILE: tl.constexpr, LOG_EB: tl.constexpr, FUSED: tl.constexpr, HAS_MAP: tl.constexpr,
):
    """Writes sorted_ids [max_padded], expert_ids [max_blocks], num_post_pad [1] (see the module doc)."""
    pid = tl.program_id(0)
    bins = tl.arange(0, EB)
    if FUSED:
        totals = _chunk_histogram(ids_ptr, map_ptr, 0, per_prog, numel, E, EB, COUNT_TILE, HAS_MAP)
        prior = tl.zeros([EB], dtype=tl.int32)
    else:
        totals = tl.load(totals_ptr + bins)
        prior = tl.load(counts_ptr + pid * EB + bins)
    padded = tl.where(bins < E, (totals + B - 1) // B * B, 0)
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    fill_end = tl.where(bins < E, starts + totals, 0)  # slots >= fill_end in e's run are padding
    if pid == 0:
        tl.store(npp_ptr, tl.sum(padded, axis=0))

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
            idx = tl.minimum(cand - 1, EB - 1)
            ok = (cand <= E) & (tl.gather(ends, idx, 0) <= bstart)
            e = tl.where(ok, cand, e)
        tl.store(expert_ids_ptr + blocks, tl.where(e < E, e, -1), mask=mask_b)
        fe = tl.gather(fill_end, e, 0)  # e == E (tail) -> 0: the whole block is sentinel
        slots = bstart[:, None] + tl.arange(0, B_P2)[None, :]
        mask_s = mask_b[:, None] & (tl.arange(0, B_P2)[None, :] < B) & (slots >= fe[:, None]) & (slots < max_padded)
        tl.store(sorted_ptr + slots, tl.zeros([NB, B_P2], dtype=tl.int32) + numel, mask=mask_s)

    # Scatter this chunk's pairs, tile by tile, in ascending pair order inside each expert. The rank of
    # a lane among equal experts of its tile is a [TILE, TILE] compare-and-count (no sort needed).
    base = starts + prior
    lanes = tl.arange(0, TILE)
    start = pid * per_prog
    for off in range(0, per_prog, TILE):
        j = start + off + lanes
        e = _local_ids(ids_ptr, map_ptr, j, j < numel, E, HAS_MAP)
        earlier = (e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + tl.gather(base, e, 0) + rank, j, mask=e < E)
        base += tl.histogram(e, EB)


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
    max_padded = numel + E * (B - 1)
    max_blocks = triton.cdiv(max_padded, B)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    eb = triton.next_power_of_2(E + 1)
    b_p2 = triton.next_power_of_2(B)
    nb = max(1, 4096 // b_p2)
    has_map = expert_map is not None
    emap = expert_map if has_map else ids
    common = dict(E=E, EB=eb, B=B, B_P2=b_p2, NB=nb, LOG_EB=eb.bit_length() - 1, HAS_MAP=has_map)
    if numel <= _FUSED_MAX:
        per_prog = max(1, triton.cdiv(numel, _TILE)) * _TILE
        _align_scatter_kernel[(1,)](
            ids, emap, sorted_ids, sorted_ids, sorted_ids, expert_ids, num_post_pad,
            numel, per_prog, max_blocks, max_blocks, max_padded,
            TILE=_TILE, COUNT_TILE=_TILE, FUSED=True, num_warps=4, **common,
        )
        return sorted_ids, expert_ids, num_post_pad
    nprog = min(triton.cdiv(numel, _COUNT_TILE), _MAX_PROGS)
    per_prog = triton.cdiv(triton.cdiv(numel, nprog), _COUNT_TILE) * _COUNT_TILE
    nprog = triton.cdiv(numel, per_prog)
    counts = torch.empty((nprog, eb), dtype=torch.int32, device=dev)
    totals = torch.empty(eb, dtype=torch.int32, device=dev)
    _align_count_kernel[(nprog,)](ids, emap, counts, numel, per_prog, E=E, EB=eb, TILE=_COUNT_TILE,
                                  HAS_MAP=has_map, num_warps=4)
    be = min(eb, 128)
    _align_scan_kernel[(eb // be,)](counts, totals, nprog, EB=eb, BE=be, BP=32, num_warps=4)
    _align_scatter_kernel[(nprog,)](
        ids, emap, counts, totals, sorted_ids, expert_ids, num_post_pad,
        numel, per_prog, triton.cdiv(max_blocks, nprog), max_blocks, max_padded,
        TILE=_TILE, COUNT_TILE=_COUNT_TILE, FUSED=False, num_warps=8, **common,
    )
    return sorted_ids, expert_ids, num_post_pad
