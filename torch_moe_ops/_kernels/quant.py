"""Online weight quantization (spec §3) and activation quantization launchers.

``q = saturate(x * (1/scale))`` with ``scale = max(amax, SCALE_EPS) / QMAX``; fp8 is e4m3fn (clamp to
±448, then a round-to-nearest-even cast), int8 rounds half to even and clamps to ±127. Scales are
computed with correctly rounded fp32 divisions (``div_rn``) so q and scales match ``reference.quant``
bit for bit.

Passes over the weights:
- per-channel (``fp8_channel``, ``int8_channel``) and ``fp8_block``: ONE pass. A program owns whole rows
  (``[BLOCK_R, next_pow2(K)]``) or one ``[bn, bk]`` block, so it reduces amax and quantizes from the
  same registers: w is read once and q written once. Rows longer than ``_MAX_ROW`` re-read the row
  (from L2) in a second loop.
- ``fp8_tensor`` (one scale per expert and shard): ONE launch (plus a tiny memset), two reads of each
  chunk: a shard's amax is only known once all of it was read. ``_quant_weight_tensor_kernel``
  interleaves "amax" items (fold a chunk's amax into its shard with an atomic max) with "quantize"
  items that start one shard plus ``_LAG_SLACK`` chunks later, wait on a per-shard counter, and re-read
  their chunk, newest first, from L2 when the shard fits. Items are handed out by an atomic ticket in
  start order, so waits only target running programs (deadlock-free; sequential in the interpreter).
  Deterministic (max is order-free).

Measured on H100 (torch 2.11, triton 3.6; copy ~3004 GB/s read + write; ``tools/quant_sweep.py``),
~1G-element bf16 w13 tensors, bytes = 2 read + 1 written per element: fp8_channel / int8_channel /
fp8_block ~3070 GB/s (~100% of copy; torch.compile of the same fp8_channel math: 2362 GB/s). fp8_tensor
depends on the shard size: 3 MB shards (Qwen3-30B-A3B) 2442 GB/s (81%); 29 MB (DeepSeek-V3) 1842 GB/s
(61%) and 117 MB (Mixtral) 1856 GB/s (62%). Once a shard plus the work in flight outgrows what L2 keeps
(about 20 MB here, measured, well under the 50 MB of L2), the second read comes from DRAM again (ncu,
Mixtral tensor: 3.76 GB read from DRAM for 1.88 GB of weights), i.e. 5 B of traffic per 3 B counted:
~3/5 of the one-pass streaming rate (~61% of copy) for ANY exact per-tensor scheme that cannot hold a
shard on chip. Evict-last/evict-first hints, 8-warp programs and 8K/32K/64K chunks measured no better.

The interpreter's fp32 -> fp8 cast mis-rounds (e.g. 127.4 -> 64) and its fp32 -> bf16 cast truncates, so
under ``TRITON_INTERPRET=1`` values are first rounded to the target grid in fp32 (``_fp8_round``,
``_bf16_round``) and the cast is then exact. On GPUs the hardware conversions (round to nearest even) run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._platform import interpret_mode
from .._spec import DEFAULT_BLOCK_SHAPE, FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_EPS, cdiv

assert SCALE_EPS == 1e-4 and FP8_MAX == 448.0 and INT8_MAX == 127.0  # literals in the kernels below

_MAX_ROW = 8192  # longest row (in elements, pow2) a program keeps in registers
_CHUNK = 16384  # fp8_tensor: elements per work item (a range of rows of one shard)
_TENSOR_TILE = 8192  # fp8_tensor: elements per loop step (large tiles keep enough bytes in flight)
_LAG_SLACK = 256  # fp8_tensor: quantize items start one shard plus this many chunks after the amax items
_REVERSE_QUANT = True  # fp8_tensor: quantize a shard's chunks last-read first (the likeliest L2 hits)
_TENSOR_WARPS = 4
_TENSOR_PHASES = 3  # diagnostics only (tools/quant_sweep.py): 1 = amax items only, 2 = quantize items only


@triton.jit
def _fp8_round(y):
    """Round fp32 (|y| <= 448) to the nearest e4m3fn value, ties to even; exact in fp32 (interpreter only)."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormal e4m3 values share the 2^-9 quantum
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    t = (y / quantum + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 add rounds to an integer, ties to even
    r = t * quantum
    return tl.where(r == 0.0, y * 0.0, r)  # keep the sign of zero


@triton.jit
def _bf16_round(y):
    """Round fp32 to the nearest bf16 value, ties to even (interpreter only: its bf16 cast truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr):
    """amax fp32 -> (scale, 1/scale), both correctly rounded like the torch reference."""
    amax = tl.maximum(amax, 1e-4)  # SCALE_EPS (fp32-rounded, like the reference's clamp_min)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    return scale, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale)


@triton.jit
def _quantize(x, inv, INT8: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """x fp32 * inv (broadcast) -> int8 (round half even, clamp ±127) or fp8 e4m3fn (clamp ±448)."""
    y = x * inv
    if INT8:
        y = tl.clamp(y, -127.0, 127.0)  # clamping before rounding is equivalent: ±127 are integers
        q = ((y + 12582912.0) - 12582912.0).to(tl.int8)
    else:
        y = tl.clamp(y, -448.0, 448.0)
        if EMULATE_FP8:
            y = _fp8_round(y)
        q = y.to(tl.float8e4nv)
    return q


@triton.jit(do_not_specialize=["rows"])
def _quant_weight_row_kernel(
    w_ptr, q_ptr, s_ptr, rows, N, K,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn,
    QMAX: tl.constexpr, INT8: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """w: [E, N, K] -> q: [E, N, K], s: [E, N] (one scale per row; rows = E*N flattened)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = r < rows
    e, n = r // N, r % N
    w_row = w_ptr + e * stride_we + n * stride_wn
    q_row = q_ptr + e * stride_qe + n * stride_qn
    offs_k = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = mask_r[:, None] & (offs_k[None, :] < K)
        x = tl.load(w_row[:, None] + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        scale, inv = _scale_of(tl.max(tl.abs(x), axis=1), QMAX)
        tl.store(q_row[:, None] + offs_k[None, :], _quantize(x, inv[:, None], INT8, EMULATE_FP8), mask=mask)
    else:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_r[:, None] & (k0 + offs_k[None, :] < K)
            x = tl.load(w_row[:, None] + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale, inv = _scale_of(amax, QMAX)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_r[:, None] & (k0 + offs_k[None, :] < K)
            x = tl.load(w_row[:, None] + k0 + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row[:, None] + k0 + offs_k[None, :], _quantize(x, inv[:, None], INT8, EMULATE_FP8),
                     mask=mask)
    tl.store(s_ptr + e * stride_se + n * stride_sn, scale, mask=mask_r)


@triton.jit
def _quant_weight_block_kernel(
    w_ptr, q_ptr, s_ptr, N, K,
    stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn, stride_sk,
    BN: tl.constexpr, BK: tl.constexpr, BN_P2: tl.constexpr, BK_P2: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    """w: [E, N, K] -> q fp8: [E, N, K], s: [E, cdiv(N, BN), cdiv(K, BK)]; grid (k-blocks, n-blocks, E)."""
    pid_k, pid_n, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN_P2)
    offs_k = pid_k * BK + tl.arange(0, BK_P2)
    mask = ((tl.arange(0, BN_P2) < BN) & (offs_n < N))[:, None] & ((tl.arange(0, BK_P2) < BK) & (offs_k < K))[None, :]
    w_off = e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x = tl.load(w_ptr + w_off, mask=mask, other=0.0).to(tl.float32)
    scale, inv = _scale_of(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 448.0)
    q_off = e * stride_qe + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]
    tl.store(q_ptr + q_off, _quantize(x, inv, False, EMULATE_FP8), mask=mask)
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, scale)


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
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_FP8: tl.constexpr, REVERSE: tl.constexpr,
    PHASES: tl.constexpr = 3,
):
    """fp8_tensor in one launch. w: [E, shards*shard_rows, K] -> q fp8 same shape, s: [E, shards].

    Work items, in the order programs START (a ticket from an atomic counter, so a program only ever
    waits for items already running: no deadlock whatever the scheduling): even items are "amax" items
    A_k (chunk k of the flattened (shard, chunk) list: fold the chunk's amax into amax[shard] and count
    it in sync[shard]); odd items are "quantize" items Q_{k - lag} (wait until all chunks of its shard
    are counted, then quantize the chunk, whose second read mostly hits L2 as it was read ~lag chunks
    earlier); the last ``lag`` items are the remaining Q items. sync: [S + 1] int32 zeros (the last is
    the ticket counter), amax: [S] fp32 zeros, S = E * shards."""
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
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # elementwise: one reduction at the end
        for r0 in range(r_lo, r_lo + rows_per_chunk, BLOCK_R):
            for k0 in range(0, K, BLOCK_K):
                ptrs, mask = _shard_chunk_ptrs(w_base, shard_rows, K, stride_wn, r0, k0, BLOCK_R, BLOCK_K)
                acc = tl.maximum(acc, tl.abs(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)))
        tl.atomic_max(amax_ptr + sh, tl.max(tl.max(acc, axis=1), axis=0), sem="relaxed")
        tl.atomic_add(sync_ptr + sh, 1, sem="release")  # publishes the atomic_max above
    if is_q:
        done = tl.atomic_add(sync_ptr + sh, 0, sem="acquire")
        if PHASES == 2:
            done = chunks
        while done < chunks:
            done = tl.atomic_add(sync_ptr + sh, 0, sem="acquire")
        scale, inv = _scale_of(tl.atomic_max(amax_ptr + sh, 0.0, sem="acquire"), 448.0)
        if c == 0:
            tl.store(s_ptr + e * stride_se + (sh % shards) * stride_ss, scale)
        q_base = q_ptr + e * stride_qe + row0.to(tl.int64) * stride_qn
        for r0 in range(r_lo, r_lo + rows_per_chunk, BLOCK_R):
            for k0 in range(0, K, BLOCK_K):
                ptrs, mask = _shard_chunk_ptrs(w_base, shard_rows, K, stride_wn, r0, k0, BLOCK_R, BLOCK_K)
                qv = _quantize(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), inv, False, EMULATE_FP8)
                q_ptrs, _ = _shard_chunk_ptrs(q_base, shard_rows, K, stride_qn, r0, k0, BLOCK_R, BLOCK_K)
                tl.store(q_ptrs, qv, mask=mask)


def _fp8_tensor(w, q, scale, shards, emulate):
    E, N, K = w.shape
    shard_rows = N // shards
    block_k = min(triton.next_power_of_2(K), 2048)
    block_r = max(1, min(triton.next_power_of_2(shard_rows), _TENSOR_TILE // block_k))
    rows_per_chunk = max(1, _CHUNK // (block_r * block_k * triton.cdiv(K, block_k))) * block_r
    chunks = triton.cdiv(shard_rows, rows_per_chunk)
    n_shards = E * shards
    # a shard's first quantize item must not wait long for its last amax item: lag >= chunks + in flight
    lag = min(chunks + _LAG_SLACK, n_shards * chunks)
    sync = torch.zeros(2 * n_shards + 1, dtype=torch.int32, device=w.device)
    amax = sync[n_shards + 1 :].view(torch.float32)  # zero bits = 0.0
    _quant_weight_tensor_kernel[(2 * n_shards * chunks + lag,)](
        w, q, scale, sync, amax, n_shards, shards, shard_rows, K, rows_per_chunk, chunks, lag,
        w.stride(0), w.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k, EMULATE_FP8=emulate, REVERSE=_REVERSE_QUANT, PHASES=_TENSOR_PHASES,
        num_warps=_TENSOR_WARPS if block_r * block_k >= 4096 else 4,
    )


def quantize_weight_into(
    w: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, block_shape=None, shards: int = 1
) -> None:
    """Quantize ``w`` into preallocated buffers (one launch; two for fp8_tensor).

    w: [E, N, K] or [N, K] bf16/fp16/fp32, ``stride(-1) == 1`` (other strides may be padded);
    qweight: same shape, float8_e4m3fn / uint8 (fp8 bits) / int8 (int8_channel), ``stride(-1) == 1``;
    scale: fp32, fp8_tensor [E, shards] ([shards]), fp8_channel/int8_channel [E, N] ([N]),
    fp8_block [E, cdiv(N, bn), cdiv(K, bk)] ([cdiv(N, bn), cdiv(K, bk)]). ``block_shape`` = (bn, bk),
    default (128, 128); ``shards`` (fp8_tensor) splits N into equal row ranges (w13: gate, up)."""
    if w.dim() == 2:
        w, qweight, scale = w[None], qweight[None], scale[None]
    if qweight.dtype == torch.uint8:
        qweight = qweight.view(FP8_DTYPE)
    assert w.stride(-1) == 1 and qweight.stride(-1) == 1, "last dim must be contiguous"
    E, N, K = w.shape
    if E == 0 or N == 0 or K == 0:
        return
    emulate = interpret_mode()
    if scheme in ("fp8_channel", "int8_channel"):
        scale = scale.reshape(E, N)
        k_p2 = triton.next_power_of_2(K)
        one_pass = k_p2 <= _MAX_ROW
        block_k = k_p2 if one_pass else 4096
        block_r = max(1, min(64, _MAX_ROW // block_k)) if one_pass else 1
        int8 = scheme == "int8_channel"
        _quant_weight_row_kernel[(triton.cdiv(E * N, block_r),)](
            w, qweight, scale, E * N, N, K,
            w.stride(0), w.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
            QMAX=INT8_MAX if int8 else FP8_MAX, INT8=int8, EMULATE_FP8=emulate,
            BLOCK_R=block_r, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=8 if block_r * block_k >= 4096 else 4,
        )
    elif scheme == "fp8_block":
        bn, bk = block_shape or DEFAULT_BLOCK_SHAPE
        bn_p2, bk_p2 = triton.next_power_of_2(bn), triton.next_power_of_2(bk)
        _quant_weight_block_kernel[(cdiv(K, bk), cdiv(N, bn), E)](
            w, qweight, scale, N, K,
            w.stride(0), w.stride(1), qweight.stride(0), qweight.stride(1),
            scale.stride(0), scale.stride(1), scale.stride(2),
            BN=bn, BK=bk, BN_P2=bn_p2, BK_P2=bk_p2, EMULATE_FP8=emulate,
            num_warps=8 if bn_p2 * bk_p2 >= 8192 else 4,
        )
    elif scheme == "fp8_tensor":
        _fp8_tensor(w, qweight, scale.reshape(E, shards), shards, emulate)
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}")


def quantize_activation(x: torch.Tensor, scheme: str, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] any float, ``stride(-1) == 1`` -> (q [T, K] fp8 e4m3fn, scale fp32: fp8_token [T, 1],
    fp8_group [T, cdiv(K, group_size)]); one pass, T not specialized (``activation._act_quant_kernel``)."""
    from .activation import act_and_quant  # local import: activation imports this module's helpers

    return act_and_quant(x, "identity", scheme=scheme, group_size=group_size)
