"""Triton router top-k (``_kernels.routing``) against ``reference.routing`` (docs/design.md §4).

Runs on a GPU or on CPU through the Triton interpreter. Logits are tie-free by construction (each row
is a shuffled grid with spacing >= 8/E), so ids must match exactly; weights to 1e-5.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import routing  # noqa: E402
from torch_moe_ops.reference.routing import topk_route as ref_topk_route  # noqa: E402

from ._jit import compiled_variants as _compiled_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}



def _tie_free_logits(T: int, E: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, E]: each row a random permutation of (i - E/2) * 8/E (distinct, exact in bf16 for E <= 64)."""
    perm = torch.argsort(torch.rand(T, E), dim=1).float()
    return ((perm - E // 2) * (8.0 / E)).to(dtype).to(DEVICE)


def _check(logits, top_k, renormalize, scoring, groups, topk_group, bias, rsf):
    w, ids = routing.topk_route(logits, top_k, renormalize, scoring, groups, topk_group, bias, rsf)
    rw, rids = ref_topk_route(logits.cpu(), top_k, renormalize, scoring, groups, topk_group,
                              None if bias is None else bias.cpu(), rsf)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], top_k)
    torch.testing.assert_close(ids.cpu(), rids, rtol=0, atol=0)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-5)


# (T, E, k, scoring, renormalize, G, kG, bias, rsf, dtype)
CASES = [
    pytest.param(1, 8, 2, "softmax", True, 0, 0, False, 1.0, "bf16", id="T1-E8-k2-softmax-bf16"),
    pytest.param(33, 60, 6, "sigmoid", False, 0, 0, False, 1.0, "fp32", id="T33-E60-k6-sigmoid-norenorm"),
    pytest.param(17, 257, 8, "softmax", True, 0, 0, True, 2.5, "fp32", id="T17-E257-k8-softmax-bias-rsf2.5"),
    pytest.param(9, 256, 8, "sigmoid", True, 8, 4, True, 2.5, "fp32", id="T9-E256-k8-G8-kG4-sigmoid-bias"),
    pytest.param(5, 96, 4, "softmax", True, 3, 2, False, 1.0, "fp32", id="T5-E96-k4-G3-kG2-softmax"),
    pytest.param(7, 160, 6, "sigmoid", False, 8, 3, True, 1.0, "fp32", id="T7-E160-k6-G8-kG3-groupsize20-bias"),
    pytest.param(6, 64, 4, "softmax", True, 1, 1, False, 1.0, "fp16", id="T6-E64-k4-G1-fp16"),
    pytest.param(3, 512, 32, "softmax", True, 0, 0, False, 1.0, "fp32", id="T3-E512-k32"),
    pytest.param(40, 128, 8, "softmax", True, 0, 0, False, 1.0, "fp32", id="T40-E128-k8-multiprogram"),
    pytest.param(4, 16, 16, "sigmoid", True, 4, 4, False, 1.0, "bf16", id="T4-E16-k16-all-experts"),
]


@pytest.mark.parametrize("T,E,k,scoring,renorm,G,kG,bias,rsf,dtype", CASES)
def test_topk_route_matches_reference(T, E, k, scoring, renorm, G, kG, bias, rsf, dtype):
    logits = _tie_free_logits(T, E, DTYPES[dtype])
    b = (torch.randn(E) * 0.05).to(DEVICE) if bias else None
    _check(logits, k, renorm, scoring, G, kG, b, rsf)


def test_topk_route_strided_logits():
    wide = _tie_free_logits(11, 200, torch.float32)
    _check(wide[:, 3:131], 4, True, "softmax", 0, 0, None, 1.0)  # row stride 200, not E
    _check(wide.t().contiguous().t()[:, :96], 4, True, "sigmoid", 4, 2, None, 1.0)  # column-major


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: sigmoid(-FLT_MAX)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_route_nan_inf(scoring):
    logits = torch.randn(5, 16)
    logits[0] = float("nan")  # all-NaN row: weights 0, ids 0..k-1
    logits[1, 3] = float("inf")
    logits[2, 5] = float("-inf")
    logits[3, :8] = float("nan")
    logits[4, ::2] = float("inf")
    w, ids = routing.topk_route(logits.to(DEVICE), 4, True, scoring, 0, 0, None, 1.0)
    rw, rids = ref_topk_route(logits, 4, True, scoring, 0, 0, None, 1.0)
    assert torch.isfinite(w).all() and ((ids >= 0) & (ids < 16)).all()
    torch.testing.assert_close(ids.cpu(), rids, rtol=0, atol=0)
    torch.testing.assert_close(w.cpu(), rw, rtol=1e-5, atol=1e-5)
    assert (w[0] == 0).all()


def test_topk_route_token_sweep_adds_no_compilations():
    """T is not specialized: every T > 1 shares one compiled kernel (T = 1 has its own, one token a program)."""
    kernel = routing._topk_route_kernel
    for T in (1, 5):
        routing.topk_route(_tie_free_logits(T, 64, torch.bfloat16), 4, True, "softmax", 0, 0, None, 1.0)
    before = _compiled_variants(kernel)
    for T in (1, 2, 3, 17, 64):
        routing.topk_route(_tie_free_logits(T, 64, torch.bfloat16), 4, True, "softmax", 0, 0, None, 1.0)
    assert _compiled_variants(kernel) == before


@pytest.mark.parametrize("grouped,group,H", [(True, 16, 40), (True, 128, 300), (True, 96, 300), (False, 0, 40),
                                             (False, 0, 300), (True, 128, 5000), (False, 0, 5000)])
@pytest.mark.parametrize("T,E", [(1, 8), (37, 4), (5, 160)])
def test_routing_kernel_quantizes_x_bitwise(grouped, group, H, T, E):
    """``quant_x``: the routing kernel's extra programs also write GEMM1's fp8 input, the bits of
    ``quantize_activation`` (q and scales), x's rows strided: a group tail (H % group), a group of 96 (not a power
    of two), rows in several steps (H = 5000: one row a program, 4096 values a step), several rows a program (H =
    300: 8), a partial last block of tokens (T = 37 at E = 4: 32 tokens a routing program), a NaN, an inf and an
    all-zero row; the routing outputs unchanged."""
    from torch_moe_ops._kernels.activation import quant_buffers, quantize_activation
    from torch_moe_ops.schemes import get_activation_quant

    aq = get_activation_quant("fp8_group" if grouped else "fp8_token")
    torch.manual_seed(T + H)
    x = (torch.randn(T, H + 8) * 3).to(torch.bfloat16).to(DEVICE)[:, :H]  # strided rows (stride H + 8)
    if T > 3:
        x[1, 7] = float("nan")
        x[2, 0] = float("inf")
        x[3] = 0
    logits = _tie_free_logits(T, E, torch.float32)
    q, s = quant_buffers(T, H, aq, group or 128, x.device)
    w, ids = routing.topk_route(logits, 2, quant_x=(x, q, s, group))
    want_q, want_s = quantize_activation(x, aq, group or 128)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s.isnan(), want_s.isnan()) and torch.equal(s.nan_to_num(), want_s.nan_to_num())
    w0, ids0 = routing.topk_route(logits, 2)
    assert torch.equal(w, w0) and torch.equal(ids, ids0)


@pytest.mark.parametrize("T,E,k,G,bm", [(2, 8, 2, 0, 16), (16, 128, 8, 0, 16), (13, 60, 6, 0, 64), (16, 64, 4, 0, 16),
                                        (7, 64, 6, 8, 32), (5, 9, 4, 0, 128)])
@pytest.mark.parametrize("mapped", [False, True])
def test_routing_kernel_aligns_like_align_block_size(T, E, k, G, bm, mapped):
    """``align``: when one routing program routes every token (``one_program``), it also writes the GEMMs'
    alignment, bitwise ``align_block_size``'s (sorted_ids with its sentinels and unused tail, expert_ids,
    num_post_pad), under an expert_map that drops experts too; the routing outputs unchanged."""
    from torch_moe_ops._kernels.align import align_buffers

    assert routing.one_program(T, E, G)
    torch.manual_seed(T * E + k)
    logits = _tie_free_logits(T, E, torch.float32)
    emap = None
    if mapped:  # a rank holding every other expert, the rest dropped
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[::2] = torch.arange((E + 1) // 2, dtype=torch.int32)
        emap = emap.to(DEVICE)
    buffers = align_buffers(T * k, E, bm, logits.device)
    for b in buffers:
        b.fill_(-7)  # every slot must be written
    route = (k, True, "softmax", G, min(2, G) if G else 0)
    w, ids = routing.topk_route(logits, *route, align=(buffers, bm, emap))
    want = routing.align_block_size(ids, E, bm, emap)
    for got, ref, name in zip(buffers, want, ("sorted_ids", "expert_ids", "num_post_pad")):
        assert torch.equal(got, ref), name
    w0, ids0 = routing.topk_route(logits, *route)
    assert torch.equal(w, w0) and torch.equal(ids, ids0)
    assert not routing.one_program(64, 128, 0) and not routing.one_program(3, 256, 0)
