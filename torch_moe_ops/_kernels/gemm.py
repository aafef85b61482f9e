"""Grouped MoE GEMM (docs/design.md §8 steps 3 and 5): rows gathered through ``sorted_ids``, one expert per
BLOCK_M block, dequantization / bias / routing weight fused into the epilogue (or the K loop).

Layout the kernel reads (one launch covers every expert):

- ``sorted_ids [max_padded] int32``: pair indices j (``j = token·k + slot``) grouped by expert, each
  expert's run padded to a multiple of BLOCK_M with the sentinel ``numel = T·k``.
- ``expert_ids [cdiv(max_padded, BLOCK_M)] int32``: the local expert of each BLOCK_M block, −1 = store zeros.
- ``num_post_pad [1] int32`` (device): programs with ``pid_m·BLOCK_M >= num_post_pad`` exit at once.
- A row of pair j is ``j // A_DIV`` (``A_DIV = top_k`` for GEMM1 on ``x [T, K]``, 1 for GEMM2 on
  ``[T·k, K]``); the output row is always j, so ``c`` is ``[T·k, N]``.
- Weights ``[E, N, K]`` with K contiguous (int4: ``[E, N, K / 2]`` bytes, element 2j in the low nibble);
  every other stride may be padded.

The quant scheme arrives as its ``GemmFlags`` (named bool constexprs); a False flag prunes its code (the
PTX of every pre-int4 scheme is line for line the one of the former ``SCHEME`` int constexpr; H200,
triton 3.6). Packed weights (``W_PACKED``: int4, mxfp4, decoded by ``formats.decode_pairs`` in the dot's
dtype) load each byte once and run two BLOCK_K/2 dots per K step, even k against the low nibbles and odd k
against the high ones; groups smaller than a K step are scaled before the dots (docs/kernels.md). Measured
on H200 with G = 128 and the former decode (2026-12-01): int4 beat int8 at decode for Qwen3-30B GEMM1
(T=1: 31 vs 55 us) but was ~5x slower than int8 in prefill (Mixtral GEMM1 T=4096: 23.8 vs 4.7 ms).
Token counts are runtime arguments in ``do_not_specialize`` (never constexpr), so a sweep over T compiles
the kernel once; all offsets that scale with tokens or experts are int64 (``T·k·N > 2³¹`` is fine).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._platform import interpret_mode, load_ahead, pdl as pdl_switch, prefetch_l2
from ..schemes import FP8_MAX, SCALE_EPS, QuantScheme, cdiv
from ._numerics import _abs_bits, _bf16_round, _from_bits, _quantize, _scale_of, _upcast_emulated
from .activation import _gated
from .formats import (block_pairs, decode_pairs, decode_scale, pair_expert, pair_rows, scale_values,
                      stored_value_scales, swizzle, tensor_scale_half)
from .configs import TileConfig, fits_scale_tile, joins_k, swaps
from .moe_sum import SlotSum, local_slots, sum_pairs, sum_tokens
from .plan import launch, tracing
from .topk import route_constexprs, route_rows


@triton.jit
def _packed_step(acc, a_ptrs, b_ptrs, b_scale_ptrs, s_step, mask_token, offs_k, offs_j, k_left, scale_off, stride_bsk,
                 W_CODEC: tl.constexpr, W_GROUP_SCALE: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr, JOIN_K: tl.constexpr,
                 SWAP_AB: tl.constexpr, B_EVICT: tl.constexpr, SCALE_AHEAD: tl.constexpr):
    """One K step on weights packed two per byte: ``a_ptrs`` [BM, BK] (loaded whole: 16-byte loads; its
    columns 2j and 2j + 1 split in registers), ``b_ptrs`` [BK/2, BN] bytes, each loaded once. Even k meet the
    low halves, odd k the high ones (``decode_pairs``): two dots of BK/2, or with JOIN_K the values put back
    in K order and one dot of BK (docs/kernels.md: fewer registers and K-loop instructions for mxfp4 prefill
    tiles, more for int4 and for decode tiles).
    BLOCK_K ≤ GROUP_K: the values are exact in the activation dtype and the step's one group scale
    multiplies the dot; BLOCK_K = n·GROUP_K: each value is scaled before the dot (``[BK/G, BN]`` scales,
    docs/kernels.md "Groups smaller than a K step"); with SCALE_AHEAD the one group scale ``s_step`` [BN] was loaded
    by the caller a step ahead (BLOCK_K = n·GROUP_K: the ``[BK/G, BN]`` scales). SWAP_AB: ``acc`` is the transposed
    tile [BN, BM] and the dots take the decoded weights as their first operand."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=mask_token[:, None], other=0.0)
        b = tl.load(b_ptrs, eviction_policy=B_EVICT)
    else:
        a = tl.load(a_ptrs, mask=mask_token[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(2 * offs_j)[:, None] < k_left, other=0, eviction_policy=B_EVICT)
    if UPCAST:  # interpreter only: its bf16 dot multiplies raw bit patterns
        a = _upcast_emulated(a)
    b_lo, b_hi = decode_pairs(b, W_CODEC, a.dtype)  # [BK/2, BN] each, in the dot's dtype
    SCALE_IN_K: tl.constexpr = W_GROUP_SCALE and BLOCK_K > GROUP_K
    if SCALE_IN_K:  # [BK/G, BN] scales, each repeated over its G/2 rows of b_lo and of b_hi
        if SCALE_AHEAD:
            s = s_step  # loaded a step ahead
        else:
            s = _group_scales(b_scale_ptrs, scale_off, stride_bsk, k_left, GROUP_K, BLOCK_K, EVEN_K)
        s = stored_value_scales(s, W_CODEC, a.dtype)
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (BLOCK_K // GROUP_K, GROUP_K // 2, s.shape[1])),
                       (BLOCK_K // 2, s.shape[1]))  # [BK/2, BN]
        b_lo, b_hi = scale_values(b_lo, s), scale_values(b_hi, s)
    if JOIN_K:  # one dot over the whole step: the values back in K order, [BK/2, 2, BN] -> [BK, BN]
        tl.static_assert(not SWAP_AB, "swapped tiles keep the half-K dots (configs.joins_k)")
        b_full = tl.reshape(tl.permute(tl.join(b_lo, b_hi), (0, 2, 1)), (BLOCK_K, b_lo.shape[1]))
        if FP32_IEEE:
            d = tl.dot(a, b_full, input_precision="ieee")
        else:
            d = tl.dot(a, b_full)
    else:  # columns 2j and 2j + 1 of a meet the low and the high halves
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))  # [BM, BK/2] each
        if FP32_IEEE:
            d = tl.dot(a_even, b_lo, input_precision="ieee")
            d = tl.dot(a_odd, b_hi, d, input_precision="ieee")
        elif SWAP_AB:
            d = tl.dot(tl.trans(b_lo), tl.trans(a_even))  # [BN, BM]
            d = tl.dot(tl.trans(b_hi), tl.trans(a_odd), d)
        else:
            d = tl.dot(a_even, b_lo)
            d = tl.dot(a_odd, b_hi, d)
    if W_GROUP_SCALE and not SCALE_IN_K:
        if SCALE_AHEAD:
            s = decode_scale(s_step, W_CODEC)  # [BN], loaded a step ahead
        else:
            s = decode_scale(tl.load(b_scale_ptrs + scale_off), W_CODEC)  # [BN]
        if SWAP_AB:
            d = d * s[:, None]
        else:
            d = d * s[None, :]
    return acc + d


@triton.jit
def _group_scales(b_scale_ptrs, scale_off, stride_bsk, k_left, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """The [BK/G, BN] stored group scales of a K step that spans BK/G groups (``b_scale_ptrs`` [BN] at group 0,
    ``scale_off`` the step's first group's offset; groups at or past ``k_left`` masked to 0)."""
    offs_g = tl.arange(0, BLOCK_K // GROUP_K)
    s_ptrs = b_scale_ptrs[None, :] + (scale_off + offs_g[:, None] * stride_bsk)
    if EVEN_K:
        s = tl.load(s_ptrs)
    else:
        s = tl.load(s_ptrs, mask=(offs_g * GROUP_K)[:, None] < k_left, other=0)
    return s


@triton.jit
def _row_step(x_row, step, K, stride_ak, offs_k, BLOCK_K: tl.constexpr):
    """[BK] of a row ``x_row`` at K step ``step`` (values at or past K: 0)."""
    return tl.load(x_row + step * BLOCK_K * stride_ak, mask=offs_k < K - step * BLOCK_K, other=0.0)


@triton.jit(do_not_specialize=["num_pid_m", "num_valid_tokens"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, sum_ptr, count_ptr, ids_ptr, map_ptr, logits_ptr, rbias_ptr,
    N, K, num_pid_m, num_valid_tokens, n_count, stride_le, rsf,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_biase, stride_biasn,
    act_alpha, act_limit, pf_ptr, pf_bytes, pf_stride_e, pf_per,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_DIV: tl.constexpr, TENSOR_SCALE_COLS: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr, BF16_RTNE: tl.constexpr,
    A_ROW_SCALE: tl.constexpr, W_TENSOR_SCALE: tl.constexpr, W_CHANNEL_SCALE: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, W_GROUP_SCALE: tl.constexpr, W_CAST: tl.constexpr, W_PACKED: tl.constexpr,
    W_CODEC: tl.constexpr, FUSE_ACT: tl.constexpr, ACT: tl.constexpr, SWIGLU_OAI: tl.constexpr, CLAMP: tl.constexpr,
    JOIN_K: tl.constexpr, SWAP_AB: tl.constexpr, ZERO_COUNT: tl.constexpr, SUM_PAIRS: tl.constexpr,
    SUM_K: tl.constexpr, SUM_KP2: tl.constexpr, SUM_T: tl.constexpr,
    PAIRS: tl.constexpr, E_IDS: tl.constexpr, E_LOCAL: tl.constexpr, HAS_MAP: tl.constexpr,
    GROUP_SIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    K_P2: tl.constexpr, GP: tl.constexpr, GS: tl.constexpr, SIGMOID: tl.constexpr, HAS_RBIAS: tl.constexpr,
    GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr,
    QUANT_A: tl.constexpr, A_QMAX: tl.constexpr, A_EPS: tl.constexpr, EMULATE_FP8: tl.constexpr,
    ACT_ROUND: tl.constexpr, PREFETCH: tl.constexpr, GDC: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):
    """PAIRS: where a program's row block gets its pairs. 0: ``sorted_ids`` / ``expert_ids`` / ``num_post_pad``
    (the alignment). 1 and 2, T = 1: pair j alone at row 0 of row block j (its k experts are distinct, so each
    expert's weights are still read once), the expert ``ids_ptr[j]`` [k] (int32/int64 ids in [0, E_IDS), local
    through ``map_ptr`` [E_IDS] int32 when HAS_MAP; a pair outside [0, E_LOCAL) stores zero rows): 1 reads the ids,
    2 routes the token itself from logits [1, E] (``topk.route_rows`` and its constexprs; correction bias
    ``rbias_ptr``), program 0 storing the weights into ``topk_weights_ptr`` [k] fp32 and the ids into ``ids_ptr``
    [k] int32 for GEMM2 (docs/kernels.md, "Two launches at T = 1").
    QUANT_A (fp8 schemes, PAIRS > 0): ``a`` [rows, K] in 16 or 32 bits, its row ``pid_m // A_DIV`` quantized here
    as ``quantize_activation`` does (its bits: one scale a row, A_ROW_SCALE, from a first pass over the row; or,
    BLOCK_SCALES, one a K step, which is then the activation group), one [BK] vector a step put at row 0 of the
    tile, so no launch quantizes it first (GEMM1: x; GEMM2: the activation's fp32 output).
    ACT_ROUND (FUSE_ACT): the dtype GEMM1's output is rounded to before the activation, "" = c's; "bf16" / "fp16"
    with an fp32 ``c`` keep the activation's output unrounded for GEMM2 to quantize, as ``act_and_quant`` does.
    PREFETCH (GEMM1, PAIRS > 0): before its K loop each program brings its ``pf_per`` bytes of expert e's slab of
    GEMM2's weights (``pf_ptr`` + e·``pf_stride_e``, ``pf_bytes`` long) into L2, and streams its own weights with
    evict_first, so that GEMM2 reads its weights from L2 while GEMM1 has the HBM (docs/kernels.md).
    SUM_K (GEMM2 on aligned rows, T ≤ SUM_T): c's rows are pairs of tokens with SUM_K slots each; the program that
    stores the last local slot of a token's column block also writes its sum into ``sum_ptr`` [T, N] (``moe_sum``'s
    bits; ``ids_ptr`` [T, SUM_K] say which slots are local; docs/kernels.md, "GEMM2 sums the slots").
    GDC (programmatic dependent launch, sm_90+; docs/kernels.md, "GEMM2 launched while GEMM1 runs"): 1 (GEMM1) lets
    the next launch start its programs now; 2 (GEMM2, launched with ``launch_pdl``) waits, before anything else,
    until the launch before it has finished and its writes are visible.
    LOAD_AHEAD (``_platform.load_ahead``): decode tiles (BLOCK_M ≤ 16) load the next K step's plain loads before
    the current step's work; the same values, so the same bits. 1: group scales of steps spanning at most two
    groups, fp8_block's scales, QUANT_A's row; 2: also the [BK/G, BN] scales of wider steps; 0: none."""
    if GDC == 1:
        gdc_launch_dependents()
    if GDC == 2:
        gdc_wait()
    if ZERO_COUNT > 0:  # GEMM1 clears GEMM2's counters (SUM_PAIRS, SUM_K), which runs after it on the stream
        if tl.program_id(0) == 0:
            offs_z = tl.arange(0, ZERO_COUNT)
            tl.store(count_ptr + offs_z, tl.zeros((ZERO_COUNT,), dtype=tl.int32), mask=offs_z < n_count)
    pid_m, pid_n = swizzle(N, num_pid_m, BLOCK_N, GROUP_M)
    if PAIRS == 0:
        if SUM_K > 0 and pid_m == 0:  # a token with no local slot is in no tile: its output row is zero
            offs_t = tl.arange(0, SUM_T)
            mask_t = offs_t < num_valid_tokens // SUM_K
            need = tl.sum(local_slots(ids_ptr, map_ptr, offs_t, mask_t, SUM_K, SUM_KP2, E_IDS, E_LOCAL, HAS_MAP)
                          .to(tl.int32), axis=1)  # [SUM_T]
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(sum_ptr + offs_t[:, None] * N + cols[None, :],
                     tl.zeros((SUM_T, BLOCK_N), dtype=sum_ptr.dtype.element_ty),
                     mask=(mask_t & (need == 0))[:, None] & (cols < N)[None, :])
        num_post_pad = tl.load(num_post_pad_ptr)
        if pid_m * BLOCK_M >= num_post_pad:
            return
        offs_token, mask_token, expert = block_pairs(sorted_ids_ptr, expert_ids_ptr, pid_m, num_post_pad,
                                                     num_valid_tokens, BLOCK_M)  # [BM], [BM], scalar
        if SUM_K > 0:  # each row's token's local slots, loaded before the K loop hides their latency
            local = local_slots(ids_ptr, map_ptr, offs_token // SUM_K, mask_token, SUM_K, SUM_KP2, E_IDS, E_LOCAL,
                                 HAS_MAP)  # [BM, SUM_KP2]
    else:
        if PAIRS == 2:  # route the token: its TOP_K experts, this block's the pid_m-th
            offs_t = tl.arange(0, 1).to(tl.int64)
            w_k, id_k = route_rows(logits_ptr, rbias_ptr, offs_t, offs_t < 1, 0, stride_le, rsf, GROUP_SIZE,
                                   NUM_GROUPS, TOPK_GROUP, TOP_K, K_P2, GP, GS, 1, SIGMOID, HAS_RBIAS, GROUPED,
                                   RENORMALIZE)  # [1, K_P2] each
            offs_k = tl.arange(0, K_P2)
            if tl.program_id(0) == 0:
                tl.store(topk_weights_ptr + offs_k[None, :], w_k, mask=offs_k[None, :] < TOP_K)
                tl.store(ids_ptr + offs_k[None, :], id_k, mask=offs_k[None, :] < TOP_K)
            raw = tl.sum(tl.sum(tl.where(offs_k[None, :] == pid_m, id_k, 0), axis=1), axis=0)
        else:
            raw = tl.load(ids_ptr + pid_m)
        offs_token, mask_token = pair_rows(pid_m, num_valid_tokens, BLOCK_M)
        expert = pair_expert(raw, map_ptr, E_IDS, E_LOCAL, HAS_MAP)

    if FUSE_ACT:  # gated activation in the epilogue: the tile's columns j pair gate (even j) and up (odd j)
        # of output column pid_n·BN/2 + j/2; c is [rows, N/2], the activation's output.
        n_out = N // 2  # the activation's output columns
        offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # [BN/2] output columns
        j = tl.arange(0, BLOCK_N)
        out_of_j = pid_n * (BLOCK_N // 2) + j // 2
        if INTERLEAVED:
            offs_cn = 2 * out_of_j + j % 2
        else:
            offs_cn = out_of_j + (j % 2) * n_out
        c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_out[None, :] * stride_cn
        mask_c = mask_token[:, None] & (offs_out[None, :] < n_out)
        if expert == -1:
            tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=c_ptr.dtype.element_ty), mask=mask_c)
            return
    else:
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_cn[None, :] * stride_cn
        mask_c = mask_token[:, None] & (offs_cn[None, :] < N)
        if expert == -1:  # block of non-local pairs: their output rows must be exactly zero
            tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=mask_c)
            if SUM_PAIRS > 0:
                sum_pairs(c_ptr, stride_cm, stride_cn, sum_ptr, count_ptr, pid_n, offs_cn, N, SUM_PAIRS, BF16_RTNE)
            return

    # Wrapping N instead of masking keeps the B loads unpredicated; the store is masked.
    offs_bn = offs_cn % N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = offs_token // A_DIV
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    if W_PACKED:  # byte j of a K step holds k = 2j (low half) and 2j + 1
        offs_j = tl.arange(0, BLOCK_K // 2)
        b_ptrs = b_ptr + expert * stride_be + offs_j[:, None] * stride_bk + offs_bn[None, :].to(tl.int64) * stride_bn
    else:
        b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_bn[None, :].to(tl.int64) * stride_bn
    if BLOCK_SCALES and not QUANT_A:  # (QUANT_A makes its scales: no a_scale)
        a_scale_ptrs = a_scale_ptr + a_rows * stride_asm
    if BLOCK_SCALES or W_GROUP_SCALE:
        b_scale_ptrs = b_scale_ptr + expert * stride_bse + (offs_bn // GROUP_N) * stride_bsn

    if QUANT_A:  # the pair's one row of a, at row 0 of the tile; the other rows are padding (zeros)
        x_row = a_ptr + (pid_m // A_DIV) * stride_am + offs_k * stride_ak  # [BK]
        row0 = (tl.arange(0, BLOCK_M) == 0)[:, None]  # [BM, 1]
        if A_ROW_SCALE:  # the row's scale first: an integer max of |x|'s bits keeps NaN (_numerics)
            amax = tl.zeros((BLOCK_K,), dtype=tl.int32)
            if LOAD_AHEAD > 0:
                y_next = _row_step(x_row, 0, K, stride_ak, offs_k, BLOCK_K)
            for kk in range(0, tl.cdiv(K, BLOCK_K)):  # LOAD_AHEAD: each step loads the next one's [BK] first
                if LOAD_AHEAD > 0:
                    y = y_next
                    y_next = _row_step(x_row, kk + 1, K, stride_ak, offs_k, BLOCK_K)
                else:
                    y = _row_step(x_row, kk, K, stride_ak, offs_k, BLOCK_K)
                amax = tl.maximum(amax, _abs_bits(y.to(tl.float32)))
            a_row_s, a_inv = _scale_of(_from_bits(tl.max(amax, axis=0)), A_QMAX, A_EPS)  # scalars
        if LOAD_AHEAD > 0:
            y_next = _row_step(x_row, 0, K, stride_ak, offs_k, BLOCK_K)  # the K loop's first [BK]: a step ahead
    B_EVICT: tl.constexpr = "evict_first" if PREFETCH else ""  # GEMM1's weights are read once
    k_steps = tl.cdiv(K, BLOCK_K)
    if PREFETCH:  # a share of GEMM2's weights of this pair's expert (>= 0 here) into L2, nothing waited for; the
        # returned 0 goes into the loop bound (in an address it would cost the loads their alignment facts)
        lo = pid_n.to(tl.int64) * pf_per
        k_steps += _prefetch_l2(pf_ptr.to(tl.pointer_type(tl.uint8)) + expert * pf_stride_e, lo,
                                tl.minimum(lo + pf_per, pf_bytes), 512)
    if SWAP_AB:  # the transposed tile: the weights' rows are the MMA's M (operand A, kept in registers)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Per-step scales are plain loads (Triton pipelines only the tiles): on decode tiles (16 rows, whose steps wait
    # on them) each step loads the next step's before its own work, so their latency is not on every step's path
    # (a step past the last reloads the last one's). One step ahead only: two (two values carried a step) made
    # Triton 3.6 drop the loop's pipelining; prefill tiles keep the loads in the step (docs/kernels.md).
    SCALE_IN_K: tl.constexpr = W_GROUP_SCALE and BLOCK_K > GROUP_K  # [BK/G, BN] scales a step, else [BN]
    # [BK/G, BN] scales ahead only up to two groups a step by default: GPT-OSS-20B mxfp4 (BK 64) gained, Qwen3-30B-A3B
    # (BK 128, four groups) lost, H100 session 16 (docs/kernels.md); no backslash here: Inductor embeds the source
    SCALE_AHEAD: tl.constexpr = ((LOAD_AHEAD >= 2 or (LOAD_AHEAD >= 1 and BLOCK_K <= 2 * GROUP_K)) and W_PACKED
                                 and W_GROUP_SCALE and BLOCK_M <= 16)
    BLOCK_AHEAD: tl.constexpr = LOAD_AHEAD > 0 and BLOCK_SCALES and BLOCK_M <= 16
    if SCALE_AHEAD and SCALE_IN_K:
        s_next = _group_scales(b_scale_ptrs, 0, stride_bsk, K, GROUP_K, BLOCK_K, EVEN_K)
    elif SCALE_AHEAD:
        s_next = tl.load(b_scale_ptrs)
    else:
        s_next = 0.0
    if BLOCK_AHEAD:
        bs_next = tl.load(b_scale_ptrs)
        if not QUANT_A:
            as_next = tl.load(a_scale_ptrs, mask=mask_token, other=0.0)
    for kk in range(0, k_steps):
        k_next = tl.minimum(kk + 1, k_steps - 1) * BLOCK_K  # the next step's first k (past the last: the last's)
        kb_next = k_next // GROUP_K  # its scale group
        if W_PACKED:
            s_cur = s_next
            if SCALE_AHEAD and SCALE_IN_K:
                s_next = _group_scales(b_scale_ptrs, kb_next * stride_bsk, stride_bsk, K - k_next, GROUP_K, BLOCK_K,
                                       EVEN_K)
            elif SCALE_AHEAD:
                s_next = tl.load(b_scale_ptrs + kb_next * stride_bsk)
            acc = _packed_step(acc, a_ptrs, b_ptrs, b_scale_ptrs, s_cur, mask_token, offs_k, offs_j, K - kk * BLOCK_K,
                               ((kk * BLOCK_K) // GROUP_K) * stride_bsk, stride_bsk, W_CODEC, W_GROUP_SCALE,
                               GROUP_K, BLOCK_K, EVEN_K, UPCAST, FP32_IEEE, JOIN_K, SWAP_AB, B_EVICT, SCALE_AHEAD)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += (BLOCK_K // 2) * stride_bk
        else:
            if QUANT_A:  # [BK] of the row -> fp8, then the [BM, BK] tile: 1/BM of the tile's work; the next
                # step's [BK] is loaded first, so its latency hides behind this step (a plain load: not pipelined)
                if LOAD_AHEAD > 0:
                    y = y_next.to(tl.float32)
                    y_next = _row_step(x_row, kk + 1, K, stride_ak, offs_k, BLOCK_K)
                else:
                    y = _row_step(x_row, kk, K, stride_ak, offs_k, BLOCK_K).to(tl.float32)
                if BLOCK_SCALES:  # the step is the group: its scale, [BM] like a loaded one
                    s_step, a_inv = _scale_of(_from_bits(tl.max(_abs_bits(y), axis=0)), A_QMAX, A_EPS)
                    a_s = tl.zeros((BLOCK_M,), dtype=tl.float32) + s_step
                q = _quantize(y, a_inv, A_QMAX, False, EMULATE_FP8, False).to(tl.uint8, bitcast=True)
                a = tl.where(row0, q[None, :], tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.uint8))
                a = a.to(tl.float8e4nv, bitcast=True)
            if EVEN_K:
                if not QUANT_A:
                    a = tl.load(a_ptrs, mask=mask_token[:, None], other=0.0)
                b = tl.load(b_ptrs, eviction_policy=B_EVICT)
            else:
                k_left = K - kk * BLOCK_K
                if not QUANT_A:
                    a = tl.load(a_ptrs, mask=mask_token[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0, eviction_policy=B_EVICT)
            if UPCAST:  # interpreter only: its bf16 dot multiplies raw bits, its fp8 dot reads NaN as 480
                a = _upcast_emulated(a)
                b = _upcast_emulated(b)
            elif W_CAST:  # integer weight-only: exact in the activation dtype, scaled after the dot
                b = b.to(a.dtype)
            if BLOCK_AHEAD:  # 1 x GROUP_K activation groups and GROUP_N x GROUP_K weight blocks
                if not QUANT_A:
                    a_s = as_next
                    as_next = tl.load(a_scale_ptrs + kb_next * stride_ask, mask=mask_token, other=0.0)
                b_s = bs_next
                bs_next = tl.load(b_scale_ptrs + kb_next * stride_bsk)
            elif BLOCK_SCALES:
                kb = (kk * BLOCK_K) // GROUP_K
                if not QUANT_A:
                    a_s = tl.load(a_scale_ptrs + kb * stride_ask, mask=mask_token, other=0.0)
                b_s = tl.load(b_scale_ptrs + kb * stride_bsk)
            if BLOCK_SCALES:
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            elif FP32_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            elif SWAP_AB:
                acc = tl.dot(tl.trans(b), tl.trans(a), acc)  # [BN, BM]
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    if SWAP_AB:
        acc = tl.trans(acc)  # [BM, BN]

    # Epilogue, all in fp32: dequantize, add bias, multiply by the routing weight, then downcast.
    if A_ROW_SCALE:
        if QUANT_A:
            a_s = tl.zeros((BLOCK_M,), dtype=tl.float32) + a_row_s
        else:
            a_s = tl.load(a_scale_ptr + a_rows * stride_asm, mask=mask_token, other=0.0)
        if W_CHANNEL_SCALE:
            b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)
            acc = acc * a_s[:, None] * b_s[None, :]
        elif W_TENSOR_SCALE and TENSOR_SCALE_COLS == 2:  # separate gate / up scales, looked up per column
            half = tensor_scale_half(offs_bn, N, INTERLEAVED)
            b_s = tl.load(b_scale_ptr + expert * stride_bse + half * stride_bsn)
            acc = acc * a_s[:, None] * b_s[None, :]
        elif W_TENSOR_SCALE:
            b_s = tl.load(b_scale_ptr + expert * stride_bse)
            acc = acc * (a_s * b_s)[:, None]
        else:
            acc = acc * a_s[:, None]
    elif W_CHANNEL_SCALE:
        b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)
        acc = acc * b_s[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_biase + offs_bn * stride_biasn)
        acc = acc + bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + offs_token, mask=mask_token, other=0.0)
        acc = acc * w.to(tl.float32)[:, None]
    if BF16_RTNE:  # interpreter only: its fp32 -> bf16 cast truncates; round to nearest even first
        acc = _bf16_round(acc)
    if FUSE_ACT:  # GEMM1's output rounded as when stored (to c's dtype or ACT_ROUND), then the activation's math
        if ACT_ROUND == "bf16":
            r = acc.to(tl.bfloat16).to(tl.float32)
        elif ACT_ROUND == "fp16":
            r = acc.to(tl.float16).to(tl.float32)
        else:
            r = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        g, u = tl.split(tl.reshape(r, (BLOCK_M, BLOCK_N // 2, 2)))
        y = _gated(g, u, act_alpha, act_limit, ACT, SWIGLU_OAI, CLAMP)
        if BF16_RTNE and ACT_ROUND == "":
            y = _bf16_round(y)
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
        if SUM_PAIRS > 0:
            sum_pairs(c_ptr, stride_cm, stride_cn, sum_ptr, count_ptr, pid_n, offs_cn, N, SUM_PAIRS, BF16_RTNE)
        if SUM_K > 0:
            sum_tokens(c_ptr, stride_cm, stride_cn, sum_ptr, count_ptr, local, offs_token, mask_token, pid_n,
                        offs_cn, N, SUM_K, SUM_KP2, BF16_RTNE)


@triton.jit
def _prefetch_l2(base, lo, hi, PF_LINES: tl.constexpr):
    """Bytes [lo, hi) of ``base`` (uint8 pointer) into L2 with evict_last priority, one PTX ``prefetch`` a
    128-byte line, PF_LINES lines a step, nothing waited for. Returns 0 (int32) for the caller to fold into its
    loop's bound: that keeps the prefetches ahead of the loop (a pure asm whose result no one uses is dropped, and
    one declared impure stops torch.compile's mutation analysis, which would then copy every input)."""
    zero = tl.zeros((PF_LINES,), dtype=tl.int32)
    for off in range(lo, hi, PF_LINES * 128):
        offs = tl.minimum(off + tl.arange(0, PF_LINES).to(tl.int64) * 128, hi - 1)  # past hi: the last line again
        zero += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                          [base + offs], dtype=tl.int32, is_pure=True, pack=1)
    return tl.max(zero, axis=0)


@functools.lru_cache(maxsize=None)
def _scheme_kwargs(scheme: QuantScheme) -> dict:
    """``scheme.kernel_kwargs()`` once per scheme (``dataclasses.asdict`` costs ~10 us a launch)."""
    return scheme.kernel_kwargs()


def gemm_grid_rows(num_slots: int, numel: int, block_m: int) -> int:
    """Row blocks to launch: ``cdiv(max_padded, BM)`` trimmed to ``numel`` (docs/design.md §8 small-T path):
    every block below ``num_post_pad`` holds at least one real pair, so at most ``numel`` blocks are used."""
    return torch.sym_min(cdiv(num_slots, block_m), numel)  # symbolic under torch.compile: no guard


def invoke_moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    sorted_ids: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    num_post_pad: torch.Tensor | None,
    *,
    top_k: int,
    config: TileConfig,
    scheme: QuantScheme,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    interleaved: bool = False,
    act: tuple | None = None,
    invariant: bool = False,
    zero_counts: tuple | None = None,
    sum_into: SlotSum | None = None,
    pair_ids: tuple | None = None,
    route: tuple | None = None,
    quant_a: bool = False,
    act_dtype: torch.dtype | None = None,
    prefetch: torch.Tensor | None = None,
    pdl: int = 0,
) -> torch.Tensor:
    """One grouped GEMM ``c[j] = epilogue(a[j // top_k] @ w[e(j)]ᵀ)``; launches on ``c``'s device, no sync.

    a: [T or T·k, K] (x dtype, or fp8 e4m3fn when ``scheme.fp8_dot``), K contiguous.
    w: [E, N, K / pack] in ``scheme.weight_dtypes(x dtype)`` (int4: uint8, two values per byte), K
    contiguous, other strides free; K is the logical (unpacked) reduction size.
    c: [T·k, N] output in the compute dtype; rows of pairs not in ``sorted_ids`` are left untouched.
    sorted_ids / expert_ids / num_post_pad: from ``align_block_size`` with ``block_size = config.block_m``.
    a_scale: fp32 [rows(a), 1] (per-row activation scales) or [rows(a), ceil(K/bk)] (fp8_block).
    w_scale: fp32, canonical (``scheme.canonical_scale``): [E, 1|2] per tensor, [E, N] per channel,
    [E, ceil(N/bn), ceil(K/bk)] per tile / group. block: canonical ``scheme.block_shape(...)``, None for
    untiled schemes; ``config.block_k`` must divide ``block[1]`` or, for [1, G] groups, be a multiple of G
    (packed: and a multiple of 32). A multiple scales the values before the dot, rounding ``value · scale`` to
    the activation dtype (exact for mxfp4's powers of two in bf16; fp16 activations keep BLOCK_K = G).
    bias: [E, N] any float dtype, added after dequantization. topk_weights: [T, k] fp32, multiplied in
    (fp32, before the downcast) when given. ``interleaved``: per-tensor ``[E, 2]`` halves are n % 2.
    ``act``: (gated ``Activation``, alpha, limit) to apply in the epilogue: ``c`` is then ``[T·k, N/2]``, the
    activation's output, bitwise what ``act_and_mul`` makes of the unfused ``c`` (no activation quantization).
    ``invariant``: ``config`` is a batch-invariant one (``configs.swaps`` then ignores BLOCK_M).
    ``sum_into`` (GEMM2, ``SlotSum``): the kernel also writes ``moe_sum``'s output of c's rows, bitwise: without
    its ``topk_ids``, at T = 1 with one pair a row block (row j of ``c`` is pair j, every pair has its block); with
    them, on aligned rows for up to ``max_tokens`` tokens. ``zero_counts``: (counts [n] int32, a static bound on
    n) the kernel clears first (GEMM1 clears GEMM2's counters).
    ``pair_ids``: (topk_ids [1, k], expert_map or None) at T = 1, instead of the alignment (None): pair j alone in
    row block j, its expert read from the ids (``_moe_gemm_kernel``'s PAIRS). ``route``: (router_logits [1, E],
    topk_route's arguments after the logits, weights [1, k] fp32) with ``pair_ids``: the kernel routes the token
    itself and writes ``weights`` and ``topk_ids`` (int32), ``topk_route``'s bits. ``quant_a`` (with ``pair_ids``,
    an fp8 scheme, ``a`` in 16 or 32 bits, no ``a_scale``): the kernel quantizes each pair's row of ``a`` itself,
    the bits of ``quantize_activation`` (``quantizes_input`` says for which tiles). ``act_dtype`` (with ``act``
    and an fp32 ``c``): GEMM1's output is rounded to it before the activation, whose output c keeps in fp32 (for a
    GEMM2 with ``quant_a``: the bits of ``act_and_quant``). ``prefetch`` (GEMM1 with ``pair_ids``): GEMM2's weights
    [E, N2, K2 / pack], each expert's slab contiguous; each program brings a share of its pair's expert's slab into
    L2 before its K loop (``prefetches``). ``pdl`` (``dependent_launch`` says where it may): 1 on GEMM1, 2 on the
    GEMM2 launched right after it: GEMM2 is then a programmatic dependent launch of GEMM1, its programs started
    while GEMM1 runs, each waiting for GEMM1's writes before its first read.
    """
    numel = c.shape[0]
    pack = scheme.weight.pack if scheme.quantized else 1
    N, K = w.shape[1], w.shape[2] * pack
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    swapped = swaps(scheme, a.element_size(), bm, invariant)
    num_pid_m = numel if pair_ids is not None else gemm_grid_rows(sorted_ids.numel(), numel, bm)
    if numel == 0 or N == 0:  # (numel > 0 means num_pid_m > 0: sorted_ids has at least numel slots)
        return c
    flags = scheme.flags
    if flags.W_GROUP_SCALE != scheme.packed:
        raise NotImplementedError(f"{scheme.name}: the GEMM applies [1, G] group scales to packed weights only")
    group_n, group_k = block if scheme.tiled else (1, 1)
    if not fits_scale_tile(bk, scheme, block):
        raise ValueError(f"BLOCK_K={bk} must divide the {scheme.name} scale tile's K size {group_k}"
                         + (" or be a multiple of it" if flags.W_GROUP_SCALE else ""))
    if flags.W_GROUP_SCALE and bk > group_k and a.dtype == torch.float16:
        bk = group_k  # value · scale can leave fp16's range: fp16 scales after the dot
    if pack > 1 and bk % (16 * pack):  # each of the pack dots of a K step needs K >= 16
        raise ValueError(f"BLOCK_K={bk} must be a multiple of {16 * pack} for packed {scheme.name} weights")
    # An absent tensor goes in as None: a constexpr to Triton (the flags prune every use), so no launcher asks the
    # driver for its pointer (a cost of every tensor argument Inductor launches; docs/host-overhead.md)
    tw = topk_weights.reshape(-1) if topk_weights is not None else None
    a_s_strides = (a_scale.stride(0), a_scale.stride(1)) if a_scale is not None else (0, 0)
    if w_scale is None:
        w_s_strides = (0, 0, 0)
    else:
        w_s_strides = tuple(w_scale.stride()) + (0,) * (3 - w_scale.dim())
    tensor_cols = w_scale.shape[1] if flags.W_TENSOR_SCALE and w_scale.dim() > 1 else 1
    grid = (num_pid_m * cdiv(N, bn),)
    if act is not None:
        activation, alpha, limit = act
        assert activation.gated and N % 2 == 0 and bn % 2 == 0 and topk_weights is None
        act_kw = dict(FUSE_ACT=True, ACT=activation.kernel, SWIGLU_OAI=activation.swiglu_oai,
                      CLAMP=activation.clamps(limit))
        alpha, limit = float(alpha), float(limit)
    else:
        act_kw = dict(FUSE_ACT=False, ACT="none", SWIGLU_OAI=False, CLAMP=False)
        alpha = limit = 0.0
    zero, zero_max = zero_counts if zero_counts is not None else (None, 0)
    out, counts = (sum_into.out, sum_into.counts) if sum_into is not None else (None, zero if zero_max else None)
    sum_kw, sum_ids = dict(SUM_PAIRS=0, SUM_K=0, SUM_KP2=1, SUM_T=1), None
    if sum_into is not None:
        assert top_k == 1 and act is None and numel > 1
        if sum_into.topk_ids is None:  # T = 1, one pair a row block
            sum_kw.update(SUM_PAIRS=numel)
        else:  # aligned rows: the ids say which slots are local
            k = sum_into.topk_ids.shape[1]
            assert sum_into.topk_ids.is_contiguous() and numel == sum_into.topk_ids.numel()
            sum_kw.update(SUM_K=k, SUM_KP2=triton.next_power_of_2(k),
                          SUM_T=triton.next_power_of_2(sum_into.max_tokens))
            sum_ids = (sum_into.topk_ids, sum_into.expert_map)
    pair_kw, ids, emap, logits, rbias, stride_le, rsf = _pair_source(pair_ids or sum_ids, route, w.shape[0], top_k,
                                                                     pairs=pair_ids is not None)
    if route is not None:
        assert topk_weights is None and numel == route[0].shape[0] * top_k
        tw = route[2]
    if quant_a:
        assert pair_ids is not None and a_scale is None and quantizes_input(scheme, block, config)
    pf_args = (0, 0, 0)  # (slab bytes, bytes between experts, bytes a program)
    if prefetch is not None:
        slab = _slab_bytes(prefetch)
        assert pair_ids is not None and slab is not None
        pf_args = (slab, prefetch.stride(0) * prefetch.element_size(), cdiv(cdiv(slab, 128), cdiv(N, bn)) * 128)
    act_round = ""
    if act is not None and act_dtype is not None and act_dtype != c.dtype:
        assert c.dtype == torch.float32, "the activation's output rounded to act_dtype is stored in fp32"
        act_round = {torch.bfloat16: "bf16", torch.float16: "fp16"}[act_dtype]
    launch(_moe_gemm_kernel, grid,
        a, w, c, a_scale, w_scale, bias, tw, sorted_ids, expert_ids, num_post_pad, out, counts, ids, emap, logits, rbias,
        N, K, num_pid_m, numel, zero.numel() if zero_max else 0, stride_le, rsf,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        *a_s_strides, *w_s_strides,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0, alpha, limit,
        prefetch, *pf_args,
        GROUP_N=group_n, GROUP_K=group_k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m,
        A_DIV=top_k, TENSOR_SCALE_COLS=tensor_cols, INTERLEAVED=interleaved,
        HAS_BIAS=bias is not None, MUL_ROUTED_WEIGHT=topk_weights is not None, EVEN_K=K % bk == 0,
        UPCAST=interpret_mode() and (quant_a or a.dtype in (torch.bfloat16, torch.float8_e4m3fn)),
        FP32_IEEE=a.dtype == torch.float32 and not quant_a,  # (quant_a: fp8 dots)
        BF16_RTNE=interpret_mode() and torch.bfloat16 in (c.dtype, act_dtype),
        **_scheme_kwargs(scheme), **act_kw,
        # mxfp4 wgmma tiles in 16 bits: one dot a step (docs/kernels.md; fp32 dots spill ~17 KB a thread with it)
        JOIN_K=joins_k(scheme, config, a.element_size(), swapped), SWAP_AB=swapped,
        ZERO_COUNT=triton.next_power_of_2(zero_max) if zero_max else 0, **sum_kw, **pair_kw,
        QUANT_A=quant_a, A_QMAX=FP8_MAX, A_EPS=SCALE_EPS, EMULATE_FP8=quant_a and interpret_mode(),
        ACT_ROUND=act_round, PREFETCH=prefetch is not None, GDC=pdl, LOAD_AHEAD=load_ahead(),
        num_warps=config.num_warps,
        num_stages=config.num_stages, **({"launch_pdl": True} if pdl == 2 else {}),
    )
    return c


#: Most bytes of GEMM2's weights GEMM1 brings into L2 at T = 1: half the 50 MB L2 of an H100 / H200, so that
#: GEMM1's own evict_first stream leaves them there.
PREFETCH_MAX_BYTES = 24 << 20


def prefetches(w2: torch.Tensor, top_k: int) -> bool:
    """Whether GEMM1 at T = 1 brings GEMM2's weights ``w2`` [E, N2, K2 / pack] of its ``top_k`` experts into L2
    (``invoke_moe_gemm``'s ``prefetch``): with ``TORCH_MOE_OPS_PREFETCH=1`` (off by default: slower on an H100),
    outside the interpreter (no PTX there), when each expert's slab is contiguous and the k slabs fit
    ``PREFETCH_MAX_BYTES``."""
    slab = _slab_bytes(w2)
    return prefetch_l2() and not interpret_mode() and slab is not None and top_k * slab <= PREFETCH_MAX_BYTES


def dependent_launch(device: torch.device) -> bool:
    """Whether GEMM2 at T = 1 may be a programmatic dependent launch of GEMM1 (``invoke_moe_gemm``'s ``pdl``): with
    ``TORCH_MOE_OPS_PDL=1`` (off by default: a gain within the noise), on sm_90 and later (``griddepcontrol``),
    outside the interpreter (no PTX there) and outside torch.compile's ``triton`` mode (``wrap_triton`` takes no
    ``launch_pdl``)."""
    return (pdl_switch() and not interpret_mode() and not tracing() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _slab_bytes(w: torch.Tensor) -> int | None:
    """Bytes of one expert's weights of ``w`` [E, N, K'] when they are one contiguous run, else None (strides
    only: no indexing, which a fake tensor under torch.compile would dispatch)."""
    E, N, K = w.shape
    if w.stride(2) != 1 or (N > 1 and w.stride(1) != K):
        return None
    return N * K * w.element_size()


def quantizes_input(scheme: QuantScheme, block, config: TileConfig) -> bool:
    """Whether a GEMM with these tiles can quantize its fp8 input itself at T = 1 (``invoke_moe_gemm``'s
    ``quant_a``): one scale a row, or a group that is one K step."""
    if scheme.act is None or scheme.packed:
        return False
    return not scheme.act.grouped or config.block_k == scheme.act_group(block)


def _pair_source(pair_ids: tuple | None, route: tuple | None, num_local: int, a_div: int, pairs: bool = True) -> tuple:
    """The kernel's PAIRS constexprs and arguments: (constexprs, ids, expert_map, logits, correction bias,
    logits' expert stride, routed scaling factor); unused tensors None. ``pairs`` False: ``pair_ids`` are the ids
    of GEMM2's fused sum on aligned rows (the map's constexprs set, PAIRS 0)."""
    ids, emap = pair_ids if pair_ids is not None else (None, None)
    logits = bias = None
    stride_le, rsf, routing = 0, 1.0, (1, 1, False, "softmax", 0, 0, False)  # no routing: placeholders
    if route is not None:
        logits, (top_k, renormalize, scoring, groups, topk_group, bias, rsf), _ = route
        assert pair_ids is not None and top_k == a_div and logits.shape[0] == 1, "route: T = 1, GEMM1"
        stride_le, rsf = logits.stride(1), float(rsf)
        routing = (logits.shape[1], top_k, renormalize, scoring, groups, topk_group, bias is not None)
    kw = route_constexprs(*routing)
    kw["HAS_RBIAS"] = kw.pop("HAS_BIAS")  # the GEMM's HAS_BIAS is the experts' bias
    kw.update(PAIRS=0, HAS_MAP=False, E_IDS=1, E_LOCAL=1)  # no specialization on E without pair ids
    if ids is not None:
        kw.update(PAIRS=(2 if route is not None else 1) if pairs else 0, HAS_MAP=emap is not None,
                  E_IDS=emap.numel() if emap is not None else num_local, E_LOCAL=num_local)
    return kw, ids, emap, logits, bias, stride_le, rsf
