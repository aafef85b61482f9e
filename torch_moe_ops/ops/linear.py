"""``moe::linear``: ``x @ weight.T + bias`` whose rows, with ``batch_invariant=True``, do not depend on the batch
(docs/batch-invariance.md): the grouped GEMM with invariant tiles on CUDA, one product per row on CPU. Without
it, ``torch.nn.functional.linear``. ``MoEBlock`` routers use it under the mode."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.invariant import rows_times
from . import _checks as C
from ._registry import define, use_triton_on_cpu

LINEAR_SCHEMA = "(Tensor x, Tensor weight, Tensor? bias=None, *, bool batch_invariant=False) -> Tensor"


def check_linear(x, weight, bias) -> None:
    C.check_tensor(x, "x", dim=2, dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    C.check_tensor(weight, "weight", dim=2, dtypes=(x.dtype,), last_contiguous=True)
    C.check(weight.shape[1] == x.shape[1], f"weight must be [N, K={x.shape[1]}] (K from x), got {list(weight.shape)}")
    if bias is not None:
        C.check_tensor(bias, "bias", dim=1, dtypes=(x.dtype,))
        C.check_shape(bias, "bias", (weight.shape[0],), " (N from weight)")
    C.check_same_device(x=x, weight=weight, bias=bias)


def run_linear(x, weight, bias, invariant: bool, on_triton: bool):
    check_linear(x, weight, bias)
    if not invariant:
        return F.linear(x, weight, bias)
    if on_triton:
        from .._kernels import linear as kernels

        return kernels.linear(x, weight, bias)
    out = rows_times(x.float(), weight.float(), True)
    return (out + bias.float() if bias is not None else out).to(x.dtype)


@define("linear", LINEAR_SCHEMA)
def _linear(x, weight, bias=None, *, batch_invariant=False):
    return run_linear(x, weight, bias, batch_invariant, on_triton=True)


@_linear.register_kernel("cpu")
def _linear_cpu(x, weight, bias=None, *, batch_invariant=False):
    return run_linear(x, weight, bias, batch_invariant, on_triton=use_triton_on_cpu())


@_linear.register_fake
def _linear_fake(x, weight, bias=None, *, batch_invariant=False):
    check_linear(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           batch_invariant: bool = False) -> torch.Tensor:
    """x: [T, K] bf16/fp16/fp32; weight: [N, K] in x's dtype; bias: [N] or None -> [T, N] in x's dtype.
    ``batch_invariant``: each row bitwise independent of the others and of T (inference: no gradient)."""
    return torch.ops.moe.linear(x, weight, bias, batch_invariant=batch_invariant)
