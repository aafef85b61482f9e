"""Early argument checks with errors that name the argument. They read shapes, dtypes and strides only
(also on FakeTensors under compile); value checks run on CPU, and on CUDA only in debug mode."""
from __future__ import annotations

import torch

from .. import _platform

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond, message: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(message)`` on a false Python bool; record a runtime assert for a symbolic one."""
    if isinstance(cond, bool):
        if not cond:
            raise exc(message)
    else:
        torch._check(cond, lambda: message)


def check_tensor(t, name: str, *, dim=None, dtypes=None, last_contiguous=False, contiguous=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        check(t.dim() in dims, f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        check(t.dtype in dtypes, f"{name} must have dtype in ({names}), got {t.dtype}", TypeError)
    if contiguous:
        check(t.is_contiguous(), f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    elif last_contiguous and t.dim() > 0:
        check(t.stride(-1) == 1 or t.shape[-1] == 1, f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_shape(t, name: str, expected: tuple, what: str = "") -> None:
    ok = t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected))
    if isinstance(ok, bool):
        check(ok, f"{name} must have shape {list(expected)}{what}, got {list(t.shape)}")
    else:
        check(t.dim() == len(expected), f"{name} must have shape {list(expected)}{what}, got {list(t.shape)}")
        for a, b in zip(t.shape, expected):
            torch._check(a == b, lambda: f"{name} must have shape {list(expected)}{what}, got {list(t.shape)}")


def values_checkable(t: torch.Tensor) -> bool:
    """Value checks synchronize a GPU: run them on CPU always, on CUDA only with TORCH_MOE_OPS_DEBUG=1."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return t.device.type == "cpu" or _platform.debug_checks()


def check_ids_in_range(ids: torch.Tensor, name: str, low: int, high: int) -> None:
    """Every value of ``ids`` in [low, high) (skipped on CUDA unless debug)."""
    if ids.numel() == 0 or not values_checkable(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())  # host-ok: CPU tensors, or CUDA in debug mode only
    if lo < low or hi >= high:
        raise ValueError(f"{name} values must lie in [{low}, {high}), got min {lo}, max {hi}")


#: (token, slot) pairs are addressed by int32 sorted ids whose sentinel is the pair count itself.
MAX_PAIRS = 2**31 - 1


def check_pairs(T, k, what: str = "hidden_states") -> None:
    """``T * k`` must fit the int32 sorted ids (checked on shapes, before any allocation; also symbolically)."""
    check(T * k <= MAX_PAIRS, f"{what}: T * top_k = {T} * {k} (token, expert) pairs exceed the int32 sorted ids "
          f"(at most 2^31 - 1 pairs); split the batch")


def check_finite(t: torch.Tensor, name: str) -> None:
    """No NaN/Inf in ``t`` (CPU always, CUDA only in debug mode: it synchronizes)."""
    if t.numel() == 0 or not values_checkable(t):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):  # host-ok: CPU tensors, or CUDA in debug mode only
        bad = (~finite).nonzero()[0].tolist()  # host-ok: error path
        value = t[tuple(bad)].item()  # host-ok: error path
        raise ValueError(f"{name} has non-finite values (first at index {bad}: {value})")
