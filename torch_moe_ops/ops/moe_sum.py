"""``moe::moe_sum`` (docs/design.md §8.2): sum each token's k expert outputs in fp32."""
from __future__ import annotations

import torch

from .. import reference
from . import _checks as C
from ._registry import define, use_triton_on_cpu

SUM_SCHEMA = "(Tensor x) -> Tensor"


def check_sum(x):
    C.check_tensor(x, "x", dim=3, dtypes=C.FLOAT_DTYPES, last_contiguous=True)


def run_sum(x, on_triton):
    check_sum(x)
    if on_triton:
        from .._kernels import moe_sum as kernels

        return kernels.moe_sum(x)
    return reference.moe_sum(x)


@define("moe_sum", SUM_SCHEMA)
def _moe_sum(x):
    return run_sum(x, on_triton=True)


@_moe_sum.register_kernel("cpu")
def _moe_sum_cpu(x):
    return run_sum(x, on_triton=use_triton_on_cpu())


@_moe_sum.register_fake
def _moe_sum_fake(x):
    check_sum(x)
    return x.new_empty((x.shape[0], x.shape[2]))


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum the k expert outputs of each token: x [T, k, H] -> [T, H], fp32 accumulation, x's dtype."""
    return torch.ops.moe.moe_sum(x)
