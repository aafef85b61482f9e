"""Numeric constants of the quantization formats (docs/design.md §3). Every other module asks these."""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
#: int4 is symmetric: ``scale = amax / 7``, values clamped to the two's-complement range [-8, 7].
INT4_MAX = 7.0
INT4_MIN = -8.0
#: OCP MX fp4 (E2M1): the magnitudes of codes 0-7 (bit 3 is the sign), and the E8M0 scale bias (2^(s - 127)).
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
E8M0_BIAS = 127
#: Scale floor of the fp8/int8 formats: ``scale = max(amax, SCALE_EPS) / QMAX`` (an all-zero row gives q = 0).
SCALE_EPS = 1e-4
FLT_MAX = torch.finfo(torch.float32).max
#: 1.5 * 2**23: adding and subtracting it rounds an fp32 |y| < 2**22 to an integer, ties to even.
ROUND_MAGIC = 12582912.0


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def round_half_even(y: torch.Tensor) -> torch.Tensor:
    return torch.round(y)
