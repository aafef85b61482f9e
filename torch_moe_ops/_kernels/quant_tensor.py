"""Per-tensor weight scales (fp8_tensor, docs/design.md §3): one scale per (expert, row shard) in ONE
launch (plus a tiny memset), two reads of each chunk: a shard's amax is only known once all of it was read.

``_quant_weight_tensor_kernel`` interleaves "amax" items (fold a chunk's amax into its shard with an atomic
max) with "quantize" items that start one shard plus ``_LAG_SLACK`` chunks later, wait on a per-shard
counter, and re-read their chunk, newest first, from L2 when the shard fits. Items are handed out by an
atomic ticket in start order, so waits only target running programs (deadlock-free; sequential in the
interpreter). Deterministic (max is order-free).

Measured on H100 (torch 2.11, triton 3.6; copy ~3004 GB/s read + write; ``tools/quant_sweep.py``),
~1G-element bf16 w13 tensors, bytes = 2 read + 1 written per element: 3 MB shards (Qwen3-30B-A3B)
2442 GB/s (81% of copy); 29 MB (DeepSeek-V3) 1842 GB/s (61%) and 117 MB (Mixtral) 1856 GB/s (62%). Once
a shard plus the work in flight outgrows what L2 keeps (about 20 MB here, measured, well under the 50 MB
of L2), the second read comes from DRAM again (ncu, Mixtral tensor: 3.76 GB read from DRAM for 1.88 GB
of weights), i.e. 5 B of traffic per 3 B counted: ~3/5 of the one-pass streaming rate (~61% of copy) for
ANY exact per-tensor scheme that cannot hold a shard on chip. Evict-last/evict-first hints, 8-warp
programs and 8K/32K/64K chunks measured no better.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._numerics import _abs_bits, _from_bits, _quantize, _scale_of

_CHUNK = 16384  # elements per work item (a range of rows of one shard)
_TENSOR_TILE = 8192  # elements per loop step (large tiles keep enough bytes in flight)
_LAG_SLACK = 256  # quantize items start one shard plus this many chunks after the amax items
_REVERSE_QUANT = True  # quantize a shard's chunks last-read first (the likeliest L2 hits)
_TENSOR_WARPS = 4
_TENSOR_PHASES = 3  # diagnostics only (tools/quant_sweep.py): 1 = amax items only, 2 = quantize items only


@triton.jit
def _shard_chunk_ptrs(base, shard_rows, K, stride_n, r0, k0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pointers and mask of the [BLOCK_R, BLOCK_K] tile at (row r0, column k0) of one shard."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_r < shard_rows)[:, None] & (offs_k < K)[None, :]
    return base + offs_r[:, None].to(tl.int64) * stride_n + offs_k[None, :], mask


@triton.jit
def _quant_weight_tensor_kernel(
    w_ptr, q_ptr, s_ptr, sync_ptr, amax_ptr, S, shards, shard_rows, K, rows_per_chunk, chunks, lag,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_ss,
    QMAX: tl.constexpr, EPS: tl.constexpr, INT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_FP8: tl.constexpr, REVERSE: tl.constexpr,
    PHASES: tl.constexpr = 3,
):
    """Per-tensor scales in one launch. w: [E, shards*shard_rows, K] -> q (fp8) same shape, s: [E, shards].

    Work items, in the order programs START (a ticket from an atomic counter, so a program only ever
    waits for items already running: no deadlock whatever the scheduling): even items are "amax" items
    A_k (chunk k of the flattened (shard, chunk) list: fold the chunk's amax into amax[shard] and count
    it in sync[shard]); odd items are "quantize" items Q_{k - lag} (wait until all chunks of its shard
    are counted, then quantize the chunk, whose second read mostly hits L2 as it was read ~lag chunks
    earlier); the last ``lag`` items are the remaining Q items. sync: [S + 1] int32 zeros (the last is
    the ticket counter), amax: [S] int32 zeros (the bits of each shard's amax), S = E * shards."""
    total = S * chunks
    i = tl.atomic_add(sync_ptr + S, 1)
    k = i // 2
    in_pairs = i < 2 * total
    is_a = in_pairs & (i % 2 == 0)
    kq = tl.where(in_pairs, k - lag, total - lag + (i - 2 * total))
    is_q = (kq >= 0) & ((i % 2 == 1) | (i >= 2 * total))
    kk = tl.where(is_a, k, kq)
    sh = kk // chunks
    c = kk % chunks
    if REVERSE:  # a shard's quantize items walk its chunks backwards: the last read is the freshest in L2
        c = tl.where(is_q, chunks - 1 - c, c)
    e = (sh // shards).to(tl.int64)
    row0 = (sh % shards) * shard_rows
    w_base = w_ptr + e * stride_we + row0.to(tl.int64) * stride_wn
    r_lo = c * rows_per_chunk
    if PHASES == 2:
        is_a = False
    if PHASES == 1:
        is_q = False
    if is_a:
        # elementwise, one reduction at the end; on the bits of |w| (an integer max keeps NaN, §3)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
        for r0 in range(r_lo, r_lo + rows_per_chunk, BLOCK_R):
            for k0 in range(0, K, BLOCK_K):
                ptrs, mask = _shard_chunk_ptrs(w_base, shard_rows, K, stride_wn, r0, k0, BLOCK_R, BLOCK_K)
                acc = tl.maximum(acc, _abs_bits(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)))
        tl.atomic_max(amax_ptr + sh, tl.max(tl.max(acc, axis=1), axis=0), sem="relaxed")
        tl.atomic_add(sync_ptr + sh, 1, sem="release")  # publishes the atomic_max above
    if is_q:
        done = tl.atomic_add(sync_ptr + sh, 0, sem="acquire")
        if PHASES == 2:
            done = chunks
        while done < chunks:
            done = tl.atomic_add(sync_ptr + sh, 0, sem="acquire")
        scale, inv = _scale_of(_from_bits(tl.atomic_max(amax_ptr + sh, 0, sem="acquire")), QMAX, EPS)
        if c == 0:
            tl.store(s_ptr + e * stride_se + (sh % shards) * stride_ss, scale)
        q_base = q_ptr + e * stride_qe + row0.to(tl.int64) * stride_qn
        for r0 in range(r_lo, r_lo + rows_per_chunk, BLOCK_R):
            for k0 in range(0, K, BLOCK_K):
                ptrs, mask = _shard_chunk_ptrs(w_base, shard_rows, K, stride_wn, r0, k0, BLOCK_R, BLOCK_K)
                qv = _quantize(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), inv, QMAX, INT, EMULATE_FP8, True)
                q_ptrs, _ = _shard_chunk_ptrs(q_base, shard_rows, K, stride_qn, r0, k0, BLOCK_R, BLOCK_K)
                tl.store(q_ptrs, qv, mask=mask)


def per_tensor(w, q, scale, shards, codec):
    """w: [E, N, K] -> q same shape, scale: [E, shards]; ``codec``: the kernel's QMAX/EPS/INT/EMULATE_FP8."""
    E, N, K = w.shape
    shard_rows = N // shards
    block_k = min(triton.next_power_of_2(K), 2048)
    block_r = max(1, min(triton.next_power_of_2(shard_rows), _TENSOR_TILE // block_k))
    rows_per_chunk = max(1, _CHUNK // (block_r * block_k * triton.cdiv(K, block_k))) * block_r
    rows_per_chunk = min(rows_per_chunk, triton.cdiv(shard_rows, block_r) * block_r)  # no all-masked tiles
    chunks = triton.cdiv(shard_rows, rows_per_chunk)
    n_shards = E * shards
    # a shard's first quantize item must not wait long for its last amax item: lag >= chunks + in flight
    lag = min(chunks + _LAG_SLACK, n_shards * chunks)
    sync = torch.zeros(2 * n_shards + 1, dtype=torch.int32, device=w.device)
    amax = sync[n_shards + 1 :]  # int32 bits of |w|'s max (zero bits = 0.0)
    _quant_weight_tensor_kernel[(2 * n_shards * chunks + lag,)](
        w, q, scale, sync, amax, n_shards, shards, shard_rows, K, rows_per_chunk, chunks, lag,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        **codec, BLOCK_R=block_r, BLOCK_K=block_k, REVERSE=_REVERSE_QUANT, PHASES=_TENSOR_PHASES,
        num_warps=_TENSOR_WARPS if block_r * block_k >= 4096 else 4,
    )
