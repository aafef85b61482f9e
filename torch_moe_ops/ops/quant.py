"""Weight and activation quantization ops (spec §3): ``quantize_weight``, ``quantize_weight_into``,
``quantize_activation``. Scales are fp32 with ``real ~= q * scale``."""
from __future__ import annotations

import torch

from .. import reference
from .._spec import ACTIVATION_SCHEMES, DEFAULT_BLOCK_SHAPE, FP8_DTYPE, WEIGHT_SCHEMES, cdiv, weight_qdtype
from . import _checks as C
from ._registry import define, use_triton_on_cpu

QW_SCHEMA = "(Tensor w, str scheme, int[]? block_shape=None, int shards=1) -> (Tensor qweight, Tensor scale)"
QW_INTO_SCHEMA = (
    "(Tensor w, Tensor(a!) qweight, Tensor(b!) scale, str scheme, int[]? block_shape=None, int shards=1) -> ()"
)
QA_SCHEMA = "(Tensor x, str scheme, int group_size=128) -> (Tensor q, Tensor scale)"


def check_block_shape(block_shape, scheme: str, name: str = "block_shape"):
    """Canonical (bn, bk) for fp8_block; None otherwise (a block_shape for another scheme is an error)."""
    if scheme != "fp8_block":
        C.check(block_shape is None, f"{name} is only used by the fp8_block scheme, got {list(block_shape or [])} with {scheme!r}")
        return None
    block_shape = tuple(block_shape) if block_shape is not None else DEFAULT_BLOCK_SHAPE
    C.check(len(block_shape) == 2 and all(b >= 1 for b in block_shape),
            f"{name} must be two positive ints [block_n, block_k], got {list(block_shape)}")
    return block_shape


def weight_scale_shape(w_shape, scheme: str, block_shape, shards: int) -> tuple:
    """fp8_tensor [E, shards]; channel [E, N]; fp8_block [E, ceil(N/bn), ceil(K/bk)]; E dropped for 2-D w."""
    *lead, N, K = w_shape
    if scheme == "fp8_tensor":
        return (*lead, shards)
    if scheme == "fp8_block":
        return (*lead, cdiv(N, block_shape[0]), cdiv(K, block_shape[1]))
    return (*lead, N)


def check_quantize_weight(w, scheme, block_shape, shards):
    C.check_tensor(w, "w", dim=(2, 3), dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    C.check(scheme in WEIGHT_SCHEMES, f"scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
    block_shape = check_block_shape(block_shape, scheme)
    C.check(shards >= 1, f"shards must be >= 1, got {shards}")
    C.check(shards == 1 or scheme == "fp8_tensor", f"shards > 1 is only meaningful for fp8_tensor, got {shards} with {scheme!r}")
    C.check(w.shape[-2] % shards == 0, f"shards ({shards}) must divide w's row count ({w.shape[-2]})")
    return block_shape


def check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards):
    block_shape = check_quantize_weight(w, scheme, block_shape, shards)
    qdtypes = (weight_qdtype(scheme),) + ((torch.uint8,) if weight_qdtype(scheme) == FP8_DTYPE else ())
    C.check_tensor(qweight, "qweight", dtypes=qdtypes, last_contiguous=True)
    C.check_shape(qweight, "qweight", tuple(w.shape), " (the shape of w)")
    C.check_tensor(scale, "scale", dtypes=(torch.float32,), contiguous=True)
    C.check_shape(scale, "scale", weight_scale_shape(w.shape, scheme, block_shape, shards), f" for scheme {scheme!r}")
    C.check_same_device(w=w, qweight=qweight, scale=scale)
    return block_shape


def quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton):
    block_shape = check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)
    if on_triton:
        from .._kernels import quant as kernels

        kernels.quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)
        return
    q, s = reference.quantize_weight(w, scheme, block_shape, shards)
    qweight.copy_(q.view(torch.uint8) if qweight.dtype == torch.uint8 else q)
    scale.copy_(s)


def _new_quantized(w, scheme, block_shape, shards):
    qweight = torch.empty(w.shape, dtype=weight_qdtype(scheme), device=w.device)
    scale = torch.empty(weight_scale_shape(w.shape, scheme, block_shape, shards), dtype=torch.float32, device=w.device)
    return qweight, scale


def quantize_new(w, scheme, block_shape, shards, on_triton):
    block_shape = check_quantize_weight(w, scheme, block_shape, shards)
    qweight, scale = _new_quantized(w, scheme, block_shape, shards)
    quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton)
    return qweight, scale


@define("quantize_weight", QW_SCHEMA)
def _quantize_weight(w, scheme, block_shape=None, shards=1):
    return quantize_new(w, scheme, block_shape, shards, on_triton=True)


@_quantize_weight.register_kernel("cpu")
def _quantize_weight_cpu(w, scheme, block_shape=None, shards=1):
    return quantize_new(w, scheme, block_shape, shards, on_triton=use_triton_on_cpu())


@_quantize_weight.register_fake
def _quantize_weight_fake(w, scheme, block_shape=None, shards=1):
    block_shape = check_quantize_weight(w, scheme, block_shape, shards)
    return _new_quantized(w, scheme, block_shape, shards)


@define("quantize_weight_into", QW_INTO_SCHEMA, mutates_args=("qweight", "scale"))
def _quantize_weight_into(w, qweight, scale, scheme, block_shape=None, shards=1):
    quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton=True)


@_quantize_weight_into.register_kernel("cpu")
def _quantize_weight_into_cpu(w, qweight, scale, scheme, block_shape=None, shards=1):
    quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton=use_triton_on_cpu())


@_quantize_weight_into.register_fake
def _quantize_weight_into_fake(w, qweight, scale, scheme, block_shape=None, shards=1):
    check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)


def check_quantize_activation(x, scheme, group_size):
    C.check_tensor(x, "x", dim=2, dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    C.check(scheme in ACTIVATION_SCHEMES, f"scheme must be one of {ACTIVATION_SCHEMES}, got {scheme!r}")
    C.check(group_size >= 1, f"group_size must be >= 1, got {group_size}")


def activation_scale_cols(K: int, scheme: str, group_size: int) -> int:
    return 1 if scheme == "fp8_token" else cdiv(K, group_size)


def quantize_act(x, scheme, group_size, on_triton):
    check_quantize_activation(x, scheme, group_size)
    if on_triton:
        from .._kernels import quant as kernels

        return kernels.quantize_activation(x, scheme, group_size)
    return reference.quantize_activation(x, scheme, group_size)


@define("quantize_activation", QA_SCHEMA)
def _quantize_activation(x, scheme, group_size=128):
    return quantize_act(x, scheme, group_size, on_triton=True)


@_quantize_activation.register_kernel("cpu")
def _quantize_activation_cpu(x, scheme, group_size=128):
    return quantize_act(x, scheme, group_size, on_triton=use_triton_on_cpu())


@_quantize_activation.register_fake
def _quantize_activation_fake(x, scheme, group_size=128):
    check_quantize_activation(x, scheme, group_size)
    T, K = x.shape
    return (x.new_empty((T, K), dtype=FP8_DTYPE),
            x.new_empty((T, activation_scale_cols(K, scheme, group_size)), dtype=torch.float32))


def quantize_weight(
    w: torch.Tensor, scheme: str, *, block_shape: list[int] | None = None, shards: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize expert weights; one pass on the GPU.

    Args:
        w: [E, N, K] or [N, K] bf16/fp16/fp32, last dim contiguous.
        scheme: ``fp8_tensor`` | ``fp8_channel`` | ``fp8_block`` | ``int8_channel``.
        block_shape: [bn, bk] for fp8_block (default [128, 128]); N and K need not be multiples.
        shards: fp8_tensor only: one scale per contiguous row shard (w13 with shards=2: gate and up).

    Returns:
        qweight: w's shape, float8_e4m3fn (int8 for int8_channel).
        scale: fp32; fp8_tensor [E, shards], channel [E, N], fp8_block [E, ceil(N/bn), ceil(K/bk)]
            (no E for 2-D w). ``scale = max(amax, 1e-4) / QMAX``: all-zero rows give q = 0, never NaN.
    """
    return torch.ops.moe.quantize_weight(w, scheme, block_shape, shards)


def quantize_weight_into(
    w: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, *,
    block_shape: list[int] | None = None, shards: int = 1,
) -> None:
    """``quantize_weight`` written into existing storage (weight reload keeps every ``data_ptr``).

    ``qweight`` may be a ``uint8`` view of fp8 storage. Shapes as in ``quantize_weight``."""
    torch.ops.moe.quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)


def quantize_activation(x: torch.Tensor, scheme: str, *, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 activation quantization; each row's result is independent of the other rows.

    Args:
        x: [T, K] bf16/fp16/fp32, last dim contiguous.
        scheme: ``fp8_token`` (one scale per row) or ``fp8_group`` (one per 1 x group_size group).

    Returns:
        q: [T, K] float8_e4m3fn; scale: [T, 1] or [T, ceil(K / group_size)] fp32.
    """
    return torch.ops.moe.quantize_activation(x, scheme, group_size)
