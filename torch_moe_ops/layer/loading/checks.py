"""Value checks of checkpoint tensors at load time (docs/design.md §10, §11).

Loading is host-driven, never a forward path, so these checks run on every device: on a CUDA tensor they
synchronize once per tensor, which is the price of never quantizing a NaN into a layer.
"""
from __future__ import annotations

import math

import torch

from ...schemes import FP8_DTYPE

#: the two NaN bytes of fp8 e4m3fn (it has no Inf): 0x7F (int8 max) and 0xFF (uint8 max)
_FP8_NAN_U8, _FP8_NAN_I8 = 0xFF, 0x7F


def first_nonfinite(t: torch.Tensor) -> tuple[list[int], float] | None:
    """``(index, value)`` of the first NaN/Inf of a floating tensor ``t`` (row-major order), or None.

    The test is ``aminmax`` (NaN propagates through min and max, an Inf is the min or the max): exact, and
    it allocates no tensor of ``t``'s size, so it adds nothing to the loading memory bound. fp8 e4m3fn (no
    ``aminmax`` on CPU) is tested on its bytes: a NaN is the maximum of the uint8 or of the int8 view. Only a
    tensor that fails is searched for the first bad index."""
    if t.numel() == 0 or not t.is_floating_point():
        return None
    if t.dtype == FP8_DTYPE:
        u8 = t.view(torch.uint8)
        if int(u8.max()) != _FP8_NAN_U8 and int(u8.view(torch.int8).max()) != _FP8_NAN_I8:  # host-ok: load-time
            return None
        bad = ((u8 & 0x7F) == 0x7F).nonzero()[0]  # host-ok: error path
        index = [int(i) for i in bad]  # host-ok: error path
        return index, float("nan")
    low, high = torch.aminmax(t)
    if math.isfinite(float(low)) and math.isfinite(float(high)):  # host-ok: load-time check
        return None
    bad = (~torch.isfinite(t)).nonzero()[0]  # host-ok: load-time check (error path)
    index = [int(i) for i in bad]  # host-ok: error path
    return index, float(t[tuple(index)])  # host-ok: error path


def check_finite(t: torch.Tensor, where: str, offset: tuple[int, ...] = ()) -> None:
    """Raise ``ValueError`` naming ``where`` and the first bad index (``offset`` prefixes it: the index of
    ``t`` inside the tensor the caller was handed) when ``t`` holds a NaN or an Inf. What was written is for the
    caller to say (one ``weight_loader`` call, or a whole checkpoint)."""
    bad = first_nonfinite(t)
    if bad is not None:
        index, value = bad
        raise ValueError(f"{where}: non-finite values (first at index {list(offset) + index}: {value})")


def check_scale(t: torch.Tensor, where: str, offset: tuple[int, ...] = ()) -> None:
    """A pre-quantized weight scale's values (``real = q * scale``; fp32, or decoded by its codec): finite and >= 0,
    else ``ValueError`` naming
    ``where`` and the first bad index (a negative scale flips the weight's sign: never a valid export)."""
    check_finite(t, where, offset)
    if t.numel() and float(t.min()) < 0:  # host-ok: load-time check
        index = [int(i) for i in (t < 0).nonzero()[0]]  # host-ok: error path
        raise ValueError(f"{where}: negative weight scale (first at index {list(offset) + index}: "
                         f"{float(t[tuple(index)])})")  # host-ok: error path


def check_materialized(t: torch.Tensor, where: str) -> None:
    """A meta tensor has a shape but no data: refuse it before anything is recorded or written."""
    if t.is_meta:
        raise ValueError(f"{where}: the tensor is on the meta device (a shape without data); materialize the "
                         "checkpoint tensor (e.g. load it on CPU) before loading it")


__all__ = ["check_finite", "check_materialized", "check_scale", "first_nonfinite"]
