"""Triton token alignment (``_kernels.align``) against ``reference.align`` (docs/design.md §7): exact equality.

Runs on a GPU or on CPU through the Triton interpreter. The multi-program path (count, scan, scatter)
is forced on small inputs by shrinking the module's tile and fused-path threshold.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import align  # noqa: E402
from torch_moe_ops.reference.align import align_block_size as ref_align  # noqa: E402

from ._jit import compiled_variants as _compiled_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def _half_local_map(E: int) -> torch.Tensor:
    """Even global experts are local (ids 0..E/2-1), odd ones live elsewhere (-1)."""
    m = torch.full((E,), -1, dtype=torch.int32)
    m[::2] = torch.arange((E + 1) // 2, dtype=torch.int32)
    return m


def _check(ids: torch.Tensor, E: int, B: int, expert_map: torch.Tensor | None = None):
    emap = None if expert_map is None else expert_map.to(DEVICE)
    got = align.align_block_size(ids.to(DEVICE), E, B, emap)
    want = ref_align(ids.cpu(), E, B, expert_map)
    for name, g, w in zip(("sorted_ids", "expert_ids", "num_post_pad"), got, want):
        assert g.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), f"{name} differs"
    return got


# (T, k, E, B, ids dtype, id range (lo, hi) or None = [0, E), expert_map)
CASES = [
    pytest.param(1, 1, 8, 16, torch.int32, None, False, id="T1-k1-E8-B16"),
    pytest.param(3, 2, 60, 16, torch.int32, None, False, id="T3-k2-E60-B16"),
    pytest.param(17, 8, 257, 64, torch.int32, None, False, id="T17-k8-E257-B64"),
    pytest.param(33, 4, 64, 16, torch.int32, None, True, id="T33-k4-E64-B16-map-half-local"),
    pytest.param(9, 4, 16, 8, torch.int64, (-5, 30), False, id="T9-k4-E16-B8-int64-out-of-range"),
    pytest.param(5, 2, 512, 128, torch.int32, None, False, id="T5-k2-E512-B128"),
    pytest.param(31, 6, 40, 24, torch.int32, (8, 12), False, id="T31-k6-E40-B24-empty-experts"),
    pytest.param(64, 8, 128, 32, torch.int64, (-3, 140), True, id="T64-k8-E128-B32-map-and-out-of-range"),
]


@pytest.mark.parametrize("T,k,E,B,dtype,id_range,use_map", CASES)
def test_align_matches_reference(T, k, E, B, dtype, id_range, use_map):
    lo, hi = id_range or (0, E)
    ids = torch.randint(lo, hi, (T, k), dtype=dtype)
    _check(ids, E, B, _half_local_map(E) if use_map else None)


@pytest.mark.parametrize(
    "T,k,E,B,dtype,id_range,use_map",
    [
        pytest.param(300, 7, 33, 16, torch.int64, (-3, 40), False, id="T300-k7-E33-B16-out-of-range"),
        pytest.param(257, 8, 64, 16, torch.int32, None, True, id="T257-k8-E64-B16-map"),
        pytest.param(200, 8, 257, 64, torch.int32, (0, 20), False, id="T200-k8-E257-B64-skewed"),
    ],
)
def test_align_multi_program_matches_reference(monkeypatch, T, k, E, B, dtype, id_range, use_map):
    monkeypatch.setattr(align, "_FUSED_MAX", 0)  # count + scan + scatter kernels
    monkeypatch.setattr(align, "_COUNT_TILE", 128)
    monkeypatch.setattr(align, "_TARGET_PROGS", 5)  # chunks of several count and scatter tiles
    lo, hi = id_range or (0, E)
    _check(torch.randint(lo, hi, (T, k), dtype=dtype), E, B, _half_local_map(E) if use_map else None)


@pytest.mark.parametrize(
    "T,k,E,B,dtype,id_range,use_map",
    [
        pytest.param(300, 7, 33, 16, torch.int64, (-3, 40), False, id="T300-k7-E33-B16-out-of-range"),
        pytest.param(257, 8, 64, 16, torch.int32, None, True, id="T257-k8-E64-B16-map"),
    ],
)
def test_align_fused_many_programs_matches_reference(monkeypatch, T, k, E, B, dtype, id_range, use_map):
    monkeypatch.setattr(align, "_FUSED_MAX", 1 << 20)  # every program re-reads all pairs; 32 programs
    lo, hi = id_range or (0, E)
    _check(torch.randint(lo, hi, (T, k), dtype=dtype), E, B, _half_local_map(E) if use_map else None)


def test_align_all_pairs_dropped():
    ids = torch.randint(0, 32, (7, 4), dtype=torch.int32)
    sorted_ids, expert_ids, npp = _check(ids, 32, 16, torch.full((32,), -1, dtype=torch.int32))
    assert npp.item() == 0 and (expert_ids == -1).all() and (sorted_ids == 28).all()


def test_align_deterministic_order():
    ids = torch.randint(0, 12, (50, 4), dtype=torch.int32).to(DEVICE)
    a = align.align_block_size(ids, 12, 16)
    b = align.align_block_size(ids, 12, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(DEVICE != "cuda", reason="large input: GPU only")
def test_align_large_default_path():
    ids = torch.randint(0, 257, (40000, 8), dtype=torch.int32)  # 320k pairs: count/scan/scatter path
    _check(ids, 257, 64)


def test_align_token_sweep_adds_no_compilations():
    kernel = align._align_scatter_kernel
    align.align_block_size(torch.randint(0, 64, (5, 8), dtype=torch.int32, device=DEVICE), 64, 16)
    before = _compiled_variants(kernel)
    for T in (1, 2, 3, 17, 64):
        align.align_block_size(torch.randint(0, 64, (T, 8), dtype=torch.int32, device=DEVICE), 64, 16)
    assert _compiled_variants(kernel) == before
