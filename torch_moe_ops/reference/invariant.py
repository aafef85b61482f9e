"""Batch-invariant building blocks of the references (docs/batch-invariance.md): CPU products and row-wise
functions whose result for a row does not depend on how many rows, or which, are computed with it."""
from __future__ import annotations

import math

import torch


def rows_times(a: torch.Tensor, w: torch.Tensor, invariant: bool = False) -> torch.Tensor:
    """a [n, K] @ w [N, K]ᵀ -> [n, N] (same dtype). ``invariant``: each row a [1, K] @ [K, N] product of its own
    (one ``torch.bmm`` over the rows), so its summation order cannot depend on n or on the other rows: CPU BLAS
    takes other kernels for a few rows than for many, and even the row's position in a block can matter
    (docs/batch-invariance.md)."""
    if not invariant:
        return a @ w.T
    n, K = a.shape
    return torch.bmm(a.view(n, 1, K), w.T.unsqueeze(0).expand(n, K, w.shape[0])).view(n, w.shape[0])


#: torch's CPU elementwise kernels: tensors under this many elements run on one thread; each thread's range is
#: a vectorized loop (SLEEF transcendentals) then a scalar tail (libm), which round differently.
_GRAIN = 32768
_VEC = 64  # a multiple of every vector loop's step (AVX-512: 32 fp32 or 64 bf16 elements a step)


def rowwise(fn, x: torch.Tensor, invariant: bool = True) -> torch.Tensor:
    """``fn(x)`` for a row-by-row ``fn`` ([n, s] -> [n, s or s/2]: an activation, a softmax) computed so that
    every row takes the same code path whatever n (``invariant``): chunks of a fixed row count, zero-padded,
    whose every intermediate is a whole number of vector steps on one thread; rows too long for that run one
    at a time (each call then has the same shape and thread split)."""
    n, s = x.shape
    if not invariant or n == 0:
        return fn(x)
    half = s // 2 if s % 2 == 0 else s
    step = _VEC // math.gcd(_VEC, half)  # rows that make both s and s/2 columns multiples of _VEC
    rows = step * ((_GRAIN // max(s, 1)) // step)
    if rows == 0:
        return torch.cat([fn(x[i:i + 1]) for i in range(n)])
    pad = (-n) % rows
    xp = torch.cat([x, x.new_zeros(pad, s)]) if pad else x
    return torch.cat([fn(xp[i:i + rows]) for i in range(0, n + pad, rows)])[:n]
