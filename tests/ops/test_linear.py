"""``moe::linear`` (docs/batch-invariance.md): F.linear by default; with ``batch_invariant=True`` rows that do not
depend on the batch (the reference on CPU, the one-expert grouped GEMM through the interpreter)."""
import pytest
import torch
import torch.nn.functional as F

from torch_moe_ops.ops import linear
from torch_moe_ops.testing import batch_variance, opcheck


def _case(T=37, K=96, N=10, dtype=torch.float32, bias=True):
    x, w = torch.randn(T, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / 8
    return x, w, (torch.randn(N, dtype=dtype) if bias else None)


def test_default_is_f_linear_and_the_mode_computes_the_same():
    x, w, b = _case()
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(linear(x, w, b, batch_invariant=True), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_rows_do_not_depend_on_the_batch(backend, dtype, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    x, w, b = _case(dtype=dtype)
    got = batch_variance(lambda x: linear(x, w, b, batch_invariant=True), (x,), sizes=(1, 5, 17))
    assert all(bad == 0 for bad, _ in got.values()), got
    if backend == "triton":  # the kernel, not a fallback: close to F.linear
        torch.testing.assert_close(linear(x, w, b, batch_invariant=True).float(), F.linear(x, w, b).float(),
                                   rtol=2e-2, atol=2e-2)


def test_opcheck_and_errors():
    x, w, b = _case(T=5)
    opcheck(torch.ops.moe.linear.default, (x, w, b), {"batch_invariant": True})
    opcheck(torch.ops.moe.linear.default, (x, w, None), {})
    with pytest.raises(ValueError, match=r"weight must be \[N, K=96\]"):
        linear(x, w[:, :50])
    with pytest.raises((TypeError, ValueError), match="weight"):
        linear(x, w.double())
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, b[:3])
    assert linear(x[:0], w, b, batch_invariant=True).shape == (0, 10)
