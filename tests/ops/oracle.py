"""Independent oracles for the op tests, written from docs/design.md (not from ``torch_moe_ops.reference``).

They are deliberately built differently from the references that back the CPU kernels, so a shared mistake is
unlikely: routing is a per-token Python loop with ``sorted`` (lower id wins ties), alignment is checked pair by
pair, quantization walks explicit blocks (a channel is a 1 x K block, a per-tensor shard an N/shards x K block),
activations are written out in float64, and fused experts run one token at a time over its k slots with a
gathered einsum. Everything returns fp32 (or raises AssertionError with a message, for alignment).
Speed is secondary: keep shapes moderate.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX, INT8_MAX, EPS = 448.0, 127.0, 1e-4  # docs/design.md §3
FLT_MAX = float(np.finfo(np.float32).max)
DEFAULT_BLOCK = (128, 128)

# ----------------------------------------------------------------------------------------------- routing §4


def scores(logits_row: torch.Tensor, scoring: str) -> torch.Tensor:
    """One token's [E] logits -> fp32 scores. ±Inf -> ±FLT_MAX, then NaN -> -inf; float64 math."""
    x = logits_row.double().clamp(-FLT_MAX, FLT_MAX)  # clamp keeps NaN
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    if scoring == "sigmoid":
        return (1.0 / (1.0 + torch.exp(-x))).float()
    m = x.max()
    if m == -math.inf:  # every logit was NaN: no expert has any probability
        return torch.zeros_like(x, dtype=torch.float32)
    ex = torch.exp(x - m)
    return (ex / ex.sum()).float()


def route(logits, k, renormalize=True, scoring="softmax", num_expert_group=0, topk_group=0, bias=None, rsf=1.0):
    """[T, E] logits -> (weights [T, k] fp32, ids [T, k] int32), one token at a time."""
    T, E = logits.shape
    weights = torch.zeros(T, k, dtype=torch.float32)
    ids = torch.zeros(T, k, dtype=torch.int32)
    for t in range(T):
        s = scores(logits[t], scoring)
        sel = (s if bias is None else s + bias.float()).tolist()  # fp32 add, like a kernel would
        candidates = list(range(E))
        if num_expert_group > 0:
            size = E // num_expert_group

            def group_score(g):
                top = sorted(sel[g * size:(g + 1) * size], reverse=True)
                return top[0] if bias is None else float(np.float32(top[0]) + np.float32(top[1]))

            groups = sorted(range(num_expert_group), key=lambda g: (-group_score(g), g))[:topk_group]
            candidates = [e for g in sorted(groups) for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: (-sel[e], e))[:k]
        w = s[chosen].double()
        if renormalize:
            w = w / w.sum() if w.sum() > 0 else torch.zeros_like(w)
        weights[t] = (w * rsf).float()
        ids[t] = torch.tensor(chosen, dtype=torch.int32)
    return weights, ids


# --------------------------------------------------------------------------------------------- alignment §7


def check_alignment(sorted_ids, expert_ids, num_post_pad, topk_ids, num_experts, block_size, expert_map=None):
    """Assert that (sorted_ids, expert_ids, num_post_pad) is a valid alignment of ``topk_ids``."""
    B = block_size
    flat = topk_ids.flatten().tolist()
    numel = len(flat)
    emap = expert_map.tolist() if expert_map is not None else None
    pairs = defaultdict(set)  # local expert -> {j}
    for j, e in enumerate(flat):
        local = emap[e] if emap is not None else e
        if local >= 0:
            pairs[local].add(j)
    max_padded = numel + num_experts * (B - 1)
    max_blocks = -(-max_padded // B)
    assert sorted_ids.dtype == expert_ids.dtype == num_post_pad.dtype == torch.int32
    assert tuple(sorted_ids.shape) == (max_padded,), f"sorted_ids shape {tuple(sorted_ids.shape)} != ({max_padded},)"
    assert tuple(expert_ids.shape) == (max_blocks,), f"expert_ids shape {tuple(expert_ids.shape)} != ({max_blocks},)"
    assert tuple(num_post_pad.shape) == (1,)

    blocks = []
    for e in sorted(pairs):
        blocks += [e] * -(-len(pairs[e]) // B)
    used = len(blocks) * B
    assert num_post_pad.tolist() == [used], f"num_post_pad {num_post_pad.tolist()} != [{used}]"
    assert expert_ids.tolist() == blocks + [-1] * (max_blocks - len(blocks)), "expert_ids differ"
    s = sorted_ids.tolist()
    assert s[used:] == [numel] * (max_padded - used), "tail of sorted_ids is not all sentinel"
    pos = 0
    for e in sorted(pairs):
        n = -(-len(pairs[e]) // B) * B
        run = s[pos:pos + n]
        real = [j for j in run if j != numel]
        assert len(real) == len(set(real)) == len(pairs[e]) and set(real) == pairs[e], f"expert {e}: wrong pairs"
        pos += n


# -------------------------------------------------------------------------------------------- activations §6


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


_BASE = {"silu": _silu, "gelu": _gelu, "gelu_tanh": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
         "relu2": lambda x: torch.clamp(x, min=0.0) ** 2}


def activation(x, name, alpha=1.702, limit=None):
    """[..., N] -> float64 [..., N/2] (gated) or [..., N] (``*_no_mul``). ``limit=None``: 7.0 for swigluoai
    (GPT-OSS), 0 (off) for the others."""
    x = x.double()
    if limit is None:
        limit = 7.0 if name == "swigluoai" else 0.0
    if name.endswith("_no_mul"):
        return _BASE[name[: -len("_no_mul")]](x)
    if name == "swigluoai":  # interleaved: gate = even columns, up = odd columns
        g, u = x[..., 0::2], x[..., 1::2]
        if limit > 0:
            g, u = torch.clamp(g, max=limit), torch.clamp(u, -limit, limit)
        return (u + 1.0) * g / (1.0 + torch.exp(-alpha * g))
    half = x.shape[-1] // 2
    g, u = x[..., :half], x[..., half:]
    if limit > 0:
        g, u = torch.clamp(g, max=limit), torch.clamp(u, -limit, limit)
    return _BASE[name](g) * u


def moe_sum(x):
    """[T, k, H] -> float64 [T, H], slot by slot."""
    out = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    for slot in range(x.shape[1]):
        out += x[:, slot].double()
    return out


# ------------------------------------------------------------------------------------------ quantization §3


def _quantize_block(blk, qmax, qdtype):
    """blk: [E, n, m] fp32 -> (q [E, n, m], scale [E]): scale = max(amax, eps)/qmax, q = sat(x * (1/scale))."""
    scale = torch.clamp(blk.abs().amax(dim=(1, 2)), min=EPS) / qmax
    y = blk * (1.0 / scale)[:, None, None]
    if qdtype == torch.int8:
        y = torch.round(y)
    return torch.clamp(y, -qmax, qmax).to(qdtype), scale


def _block_dims(scheme, N, K, block_shape, shards):
    if scheme == "fp8_tensor":
        return N // shards, K
    if scheme in ("fp8_channel", "int8_channel"):
        return 1, K
    return tuple(block_shape or DEFAULT_BLOCK)


def quantize_int4(w, group=128):
    """[E, N, K] or [N, K] float -> (packed uint8 [.., N, K // 2], scale fp32 [.., N, K // group]), one group at
    a time: scale = amax / 7 (0 for an all-zero group), q = round(x / scale) in [-8, 7], two's complement,
    element 2j in the low nibble of byte j and 2j + 1 in the high nibble."""
    w3 = (w[None] if w.dim() == 2 else w).float()
    E, N, K = w3.shape
    assert K % group == 0
    q = torch.empty(E, N, K, dtype=torch.int64)
    scale = torch.empty(E, N, K // group, dtype=torch.float32)
    for j in range(K // group):
        blk = w3[:, :, j * group:(j + 1) * group]
        s = blk.abs().amax(-1) / 7.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[:, :, j * group:(j + 1) * group] = torch.clamp(torch.round(blk * inv[..., None]), -8, 7).long()
        scale[:, :, j] = s
    nib = torch.where(q < 0, q + 16, q)  # two's complement nibble
    packed = (nib[..., 0::2] + 16 * nib[..., 1::2]).to(torch.uint8)
    return (packed[0], scale[0]) if w.dim() == 2 else (packed, scale)


def dequantize_int4(packed, scale, group=128):
    """Inverse of ``quantize_int4``: fp32 [E, N, K]."""
    p = packed.long()
    lo, hi = p % 16, p // 16
    vals = torch.stack([lo, hi], -1).flatten(-2)
    vals = torch.where(vals >= 8, vals - 16, vals).float()
    return vals * scale.repeat_interleave(group, dim=-1)


def quantize_weight(w, scheme, block_shape=None, shards=1):
    """[E, N, K] or [N, K] float -> (q, fp32 scale) with the op's shapes, one block at a time."""
    if scheme == "int4_group":
        return quantize_int4(w, (block_shape or (1, 128))[1])
    w3 = (w[None] if w.dim() == 2 else w).float()
    E, N, K = w3.shape
    qmax, qdtype = (INT8_MAX, torch.int8) if scheme.startswith("int8") else (FP8_MAX, FP8)
    bn, bk = _block_dims(scheme, N, K, block_shape, shards)
    nb, kb = -(-N // bn), -(-K // bk)
    q = torch.empty(E, N, K, dtype=qdtype)
    scale = torch.empty(E, nb, kb, dtype=torch.float32)
    for i in range(nb):
        for j in range(kb):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            q[:, rows, cols], scale[:, i, j] = _quantize_block(w3[:, rows, cols], qmax, qdtype)
    if scheme != "fp8_block":
        scale = scale.reshape(E, nb)  # fp8_tensor [E, shards]; channel [E, N]
    return (q[0], scale[0]) if w.dim() == 2 else (q, scale)


def dequantize_weight(q, scale, scheme, block_shape=None, interleaved=False):
    """[E, N, K] q + scale -> fp32. ``interleaved``: fp8_tensor [E, 2] scales for swigluoai rows g0,u0,g1,u1..."""
    if scheme == "int4_group":
        return dequantize_int4(q, scale, (block_shape or (1, 128))[1])
    E, N, K = q.shape
    full = torch.empty(E, N, K, dtype=torch.float32)
    if scheme == "fp8_tensor":
        s = scale.reshape(E, -1)
        for c in range(s.shape[1]):
            n = N // s.shape[1]
            rows = slice(c, None, 2) if interleaved and s.shape[1] == 2 else slice(c * n, (c + 1) * n)
            full[:, rows, :] = s[:, c, None, None]
        return q.float() * full
    bn, bk = _block_dims(scheme, N, K, block_shape, 1)
    s = scale.reshape(E, -(-N // bn), -(-K // bk))
    for i in range(s.shape[1]):
        for j in range(s.shape[2]):
            full[:, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = s[:, i, j, None, None]
    return q.float() * full


def quantize_activation(x, scheme, group_size=128):
    """[T, K] -> (q [T, K] fp8, scale fp32 [T, 1] or [T, ceil(K/g)]): one row group at a time."""
    T, K = x.shape
    g = K if scheme == "fp8_token" else group_size
    q = torch.empty(T, K, dtype=FP8)
    scale = torch.empty(T, -(-K // g), dtype=torch.float32)
    for c in range(scale.shape[1]):
        cols = slice(c * g, (c + 1) * g)
        qc, sc = _quantize_block(x[:, None, cols].float(), FP8_MAX, FP8)
        q[:, cols], scale[:, c] = qc[:, 0], sc
    return q, scale


def fake_quantize_rows(a, scheme, group_size):
    """What a GEMM sees after dynamic activation quantization of the rows of ``a`` [R, K] (fp32)."""
    if scheme is None:
        return a.float()
    q, s = quantize_activation(a, scheme, group_size)
    g = a.shape[1] if scheme == "fp8_token" else group_size
    return q.float() * s.repeat_interleave(g, dim=1)[:, : a.shape[1]]


# ------------------------------------------------------------------------------------------ fused experts §8

SCHEMES = {"none": (None, None), "fp8_tensor": ("fp8_tensor", "fp8_token"),
           "fp8_channel": ("fp8_channel", "fp8_token"), "fp8_block": ("fp8_block", "fp8_group"),
           "int8_w8a16": ("int8_channel", None), "int4_w4a16": ("int4_group", None)}


def fused_experts(x, w13, w2, topk_weights, topk_ids, activation_name="silu", quant_scheme="none", w13_scale=None,
                  w2_scale=None, w13_bias=None, w2_bias=None, block_shape=None, expert_map=None,
                  apply_router_weight_on_input=False, alpha=1.702, limit=None):
    """out[t] = sum over slots s with a local expert e of  w * (q(f(q(x_t) @ W13[e]^T + b13[e])) @ W2[e]^T + b2[e])
    (q = dynamic activation quantization of the scheme), the weight applied on the GEMM1 input instead when
    ``apply_router_weight_on_input``. fp32 [T, H]."""
    wscheme, ascheme = SCHEMES[quant_scheme]
    block_shape = tuple(block_shape or ((1, 128) if wscheme == "int4_group" else DEFAULT_BLOCK))
    if limit is None:  # the op's default: GPT-OSS's clamp for swigluoai, none otherwise
        limit = 7.0 if activation_name == "swigluoai" else 0.0
    if wscheme is None:
        W13, W2 = w13.float(), w2.float()
    else:
        W13 = dequantize_weight(w13, w13_scale, wscheme, block_shape, interleaved=activation_name == "swigluoai")
        W2 = dequantize_weight(w2, w2_scale, wscheme, block_shape)
    E, N1, H = W13.shape
    b13 = w13_bias.float() if w13_bias is not None else torch.zeros(E, N1)
    b2 = w2_bias.float() if w2_bias is not None else torch.zeros(E, H)
    emap = expert_map.tolist() if expert_map is not None else None
    T = x.shape[0]
    out = torch.zeros(T, H, dtype=torch.float32)
    for t in range(T):
        slots, experts = [], []
        for slot, e in enumerate(topk_ids[t].tolist()):
            local = emap[e] if emap is not None else e
            if local >= 0:
                slots.append(slot)
                experts.append(local)
        if not slots:
            continue
        ex = torch.tensor(experts)
        w = topk_weights[t, slots].float()[:, None]  # [s, 1]
        a = x[t].float().expand(len(slots), H)
        if apply_router_weight_on_input:
            a = a * w
        a = fake_quantize_rows(a, ascheme, block_shape[1])
        h = torch.einsum("sh,snh->sn", a, W13[ex]) + b13[ex]
        h = activation(h, activation_name, alpha, limit).float()
        h = fake_quantize_rows(h, ascheme, block_shape[1])
        y = torch.einsum("si,shi->sh", h, W2[ex]) + b2[ex]
        if not apply_router_weight_on_input:
            y = y * w
        out[t] = y.sum(0)
    return out
