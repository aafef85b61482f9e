"""Triton moe_sum (``_kernels.moe_sum``) against ``reference.moe_sum`` (docs/design.md §8.2), and its
skipping of dropped slots. GPU, or CPU through the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import moe_sum  # noqa: E402
from torch_moe_ops.reference import activation as ref_act  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-5)}


@pytest.mark.parametrize(
    "T,k,H,dtype",
    [pytest.param(1, 1, 64, "bf16", id="T1-k1-H64-bf16"), pytest.param(5, 3, 100, "fp16", id="T5-k3-H100-fp16"),
     pytest.param(9, 8, 257, "fp32", id="T9-k8-H257-fp32"), pytest.param(4, 32, 40, "bf16", id="T4-k32-H40-bf16")],
)
def test_moe_sum_matches_reference(T, k, H, dtype):
    x = torch.randn(T, k, H).to(DTYPES[dtype]).to(DEVICE)
    y = moe_sum.moe_sum(x)
    want = ref_act.moe_sum(x.cpu())
    assert y.dtype == x.dtype and y.shape == (T, H)
    torch.testing.assert_close(y.cpu().float(), want.float(), **TOL[x.dtype])


@pytest.mark.parametrize("with_map,ids_dtype", [(False, torch.int32), (True, torch.int32), (True, torch.int64)])
def test_moe_sum_skips_dropped_slots(with_map, ids_dtype):
    """Slots with ids outside [0, E) or mapped to -1 are never read (NaN there must not leak)."""
    T, k, H, E = 6, 3, 70, 5
    x = torch.randn(T, k, H)
    ids = torch.randint(0, E, (T, k), dtype=ids_dtype)
    ids[0, 1], ids[2, 0], ids[4, 2], ids[5, 1] = -1, E, E + 7, -9
    emap = torch.tensor([0, -1, 1, 2, -1], dtype=torch.int32)
    keep = (ids >= 0) & (ids < E)
    if with_map:
        keep &= emap[ids.clamp(0, E - 1).long()] >= 0
    x[~keep] = float("nan")
    y = moe_sum.moe_sum(x.to(DEVICE), topk_ids=ids.to(DEVICE), expert_map=emap.to(DEVICE) if with_map else None,
                        num_experts=E)
    want = torch.where(keep[:, :, None], x, 0.0).sum(1)
    assert keep.sum() < T * k and torch.isfinite(y.cpu()).all()
    torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)
