"""GEMM1's L2 prefetch of GEMM2's weights at T = 1 (``TORCH_MOE_OPS_PREFETCH=1``), GEMM2 as a programmatic
dependent launch of GEMM1 (``TORCH_MOE_OPS_PDL=1``; docs/kernels.md): when each applies. The kernel paths
themselves are PTX (no interpreter): compiled for sm_90a by tools/sm90_compile.py, traced under torch.compile in
tests/ops/test_decompose.py, run bitwise against the plain path in tests/_kernels/test_plan_cuda.py.
"""
from __future__ import annotations

import pytest
import torch

from torch_moe_ops._kernels import gemm, plan
from torch_moe_ops._platform import PDL_ENV, PREFETCH_ENV


def test_a_slab_is_one_contiguous_run_of_an_experts_weights():
    w = torch.empty(6, 40, 24, device="meta", dtype=torch.bfloat16)
    assert gemm._slab_bytes(w) == 40 * 24 * 2
    assert gemm._slab_bytes(w[::2]) == 40 * 24 * 2  # experts apart: each still one run
    assert gemm._slab_bytes(w[:, :, :12]) is None  # rows apart
    assert gemm._slab_bytes(w.transpose(1, 2)) is None
    assert gemm._slab_bytes(w[:, :1]) == 24 * 2  # one row: its stride does not matter


@pytest.mark.parametrize("flag,interpreted,k,want", [(None, False, 8, False), ("0", False, 8, False),
                                                      ("1", True, 8, False), ("1", False, 8, True),
                                                      ("1", False, 9, False)])
def test_prefetch_needs_the_switch_a_gpu_and_room_in_l2(monkeypatch, flag, interpreted, k, want):
    """Qwen3-30B-A3B's w2 in bf16: 8 experts of 3 MiB fit the 24 MiB bound, 9 do not."""
    if flag is None:
        monkeypatch.delenv(PREFETCH_ENV, raising=False)
    else:
        monkeypatch.setenv(PREFETCH_ENV, flag)
    monkeypatch.setattr(gemm, "interpret_mode", lambda: interpreted)
    w2 = torch.empty(128, 2048, 768, device="meta", dtype=torch.bfloat16)
    assert gemm.prefetches(w2, k) is want


@pytest.mark.parametrize("flag,interpreted,traced,device,capability,want", [
    (None, False, False, "cuda", 9, False), ("0", False, False, "cuda", 9, False), ("1", False, False, "cuda", 9, True),
    ("1", False, False, "cuda", 10, True), ("1", False, False, "cuda", 8, False), ("1", True, False, "cuda", 9, False),
    ("1", False, True, "cuda", 9, False), ("1", False, False, "cpu", 9, False)])
def test_a_dependent_launch_needs_the_switch_sm90_and_no_tracing(monkeypatch, flag, interpreted, traced, device,
                                                                 capability, want):
    """griddepcontrol is sm_90+ PTX (no interpreter), and Inductor's wrap_triton takes no launch_pdl."""
    if flag is None:
        monkeypatch.delenv(PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(PDL_ENV, flag)
    monkeypatch.setattr(gemm, "interpret_mode", lambda: interpreted)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability, 0))
    if traced:
        with plan.traced_launches():
            assert plan.tracing()
            assert gemm.dependent_launch(torch.device(device)) is want
        assert not plan.tracing()
    else:
        assert gemm.dependent_launch(torch.device(device)) is want
