"""Numeric constants of the quantization formats (docs/design.md §3). Every other module asks these."""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
#: int4 is symmetric: ``scale = amax / 7``, values clamped to the two's-complement range [-8, 7].
INT4_MAX = 7.0
INT4_MIN = -8.0
#: Scale floor of the fp8/int8 formats: ``scale = max(amax, SCALE_EPS) / QMAX`` (an all-zero row gives q = 0).
SCALE_EPS = 1e-4
FLT_MAX = torch.finfo(torch.float32).max
#: 1.5 * 2**23: adding and subtracting it rounds an fp32 |y| < 2**22 to an integer, ties to even.
ROUND_MAGIC = 12582912.0


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def round_half_even(y: torch.Tensor) -> torch.Tensor:
    return torch.round(y)
