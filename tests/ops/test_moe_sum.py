"""``moe::moe_sum`` (docs/design.md §8.2) against a slot-by-slot float64 sum. The design tolerance is atol 2e-2; we also
require the relative error of a single output rounding (fp32 accumulation, one cast)."""
import pytest
import torch

from . import oracle
import torch_moe_ops

from ._data import padded

TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2 ** -7, 1e-5), torch.float16: (2 ** -10, 1e-5)}  # one output ulp


@pytest.mark.parametrize("T,k,H", [(1, 1, 72), (7, 2, 136), (64, 6, 72), (333, 8, 136), (0, 2, 72)],
                         ids=["T1-k1-H72", "T7-k2-H136", "T64-k6-H72", "T333-k8-H136", "T0-k2-H72"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_moe_sum(T, k, H, dtype):
    x = (torch.randn(T, k, H) / 10).to(dtype)  # docs/design.md §13 inputs: randn / 10
    with torch.inference_mode():
        y = torch_moe_ops.moe_sum(x)
    ref = oracle.moe_sum(x)
    assert y.dtype == dtype and y.shape == (T, H)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-2)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref.to(dtype).double() if dtype != torch.float32 else ref, rtol=rtol,
                               atol=atol)


def test_moe_sum_bf16_accumulates_in_fp32():
    """Summing eight bf16 values pairwise in bf16 would lose the small ones."""
    x = torch.tensor([256.0] + [1.0] * 7, dtype=torch.bfloat16).view(1, 8, 1)
    assert torch_moe_ops.moe_sum(x).item() == 264.0  # 256 + 1 rounds back to 256 in bf16


def test_moe_sum_strided():
    x = padded(torch.randn(9, 3, 72))
    torch.testing.assert_close(torch_moe_ops.moe_sum(x).double(), oracle.moe_sum(x), rtol=1e-6, atol=1e-6)
