"""Weight and activation quantization ops (docs/design.md §3): ``quantize_weight``, ``quantize_weight_into``,
``quantize_activation``. Scales are fp32 with ``real ~= q * scale``. Scheme names are resolved here, once,
into registry objects (``torch_moe_ops.schemes``)."""
from __future__ import annotations

import torch

from ..schemes import FP8_DTYPE, ActivationQuant, WeightFormat, get_activation_quant, get_weight_format
from . import _checks as C
from ._registry import define, use_triton_on_cpu

QW_SCHEMA = "(Tensor w, str scheme, int[]? block_shape=None, int shards=1) -> (Tensor qweight, Tensor scale)"
QW_INTO_SCHEMA = (
    "(Tensor w, Tensor(a!) qweight, Tensor(b!) scale, str scheme, int[]? block_shape=None, int shards=1) -> ()"
)
QA_SCHEMA = "(Tensor x, str scheme, int group_size=128) -> (Tensor q, Tensor scale)"


def _format(scheme) -> WeightFormat:
    try:
        return get_weight_format(scheme)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def check_quantize_weight(w, scheme, block_shape, shards) -> tuple[WeightFormat, tuple | None]:
    """-> (format, canonical scale tile or None)."""
    C.check_tensor(w, "w", dim=(2, 3), dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    fmt = _format(scheme)
    block = fmt.block_shape(block_shape)
    fmt.check_shape(tuple(w.shape), block, shards)
    return fmt, block


def check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards):
    fmt, block = check_quantize_weight(w, scheme, block_shape, shards)
    C.check_tensor(qweight, "qweight", dtypes=fmt.storage_dtypes, last_contiguous=True)
    packed = " (the shape of w)" if fmt.pack == 1 else f" (w's shape with K / {fmt.pack}: {fmt.pack} values per byte)"
    C.check_shape(qweight, "qweight", fmt.packed_shape(tuple(w.shape)), packed)
    C.check_tensor(scale, "scale", dtypes=(fmt.scale_dtype,), contiguous=True)
    C.check_shape(scale, "scale", fmt.scale_shape(tuple(w.shape), block, shards), f" for scheme {fmt.name!r}")
    C.check_same_device(w=w, qweight=qweight, scale=scale)
    return fmt, block


def quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton):
    fmt, block = check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)
    C.check_finite(w, "w")  # a NaN/Inf weight would poison its whole row/block/shard scale (CPU; CUDA in debug)
    if on_triton:
        from .._kernels import quant as kernels

        kernels.quantize_weight_into(w, qweight, scale, fmt, block, shards)
        return
    w3 = w[None] if w.dim() == 2 else w
    q, s = fmt.quantize(w3, block, shards)
    q, s = (q[0], s[0]) if w.dim() == 2 else (q, s)
    qweight.copy_(q.view(torch.uint8) if qweight.dtype != q.dtype else q)
    scale.copy_(s)


def _new_quantized(w, fmt: WeightFormat, block, shards):
    qweight = torch.empty(fmt.packed_shape(tuple(w.shape)), dtype=fmt.qdtype, device=w.device)
    scale = torch.empty(fmt.scale_shape(tuple(w.shape), block, shards), dtype=fmt.scale_dtype, device=w.device)
    return qweight, scale


def quantize_new(w, scheme, block_shape, shards, on_triton):
    fmt, block = check_quantize_weight(w, scheme, block_shape, shards)
    qweight, scale = _new_quantized(w, fmt, block, shards)
    quantize_into(w, qweight, scale, fmt, block_shape, shards, on_triton)
    return qweight, scale


@define("quantize_weight", QW_SCHEMA)
def _quantize_weight(w, scheme, block_shape=None, shards=1):
    return quantize_new(w, scheme, block_shape, shards, on_triton=True)


@_quantize_weight.register_kernel("cpu")
def _quantize_weight_cpu(w, scheme, block_shape=None, shards=1):
    return quantize_new(w, scheme, block_shape, shards, on_triton=use_triton_on_cpu())


@_quantize_weight.register_fake
def _quantize_weight_fake(w, scheme, block_shape=None, shards=1):
    fmt, block = check_quantize_weight(w, scheme, block_shape, shards)
    return _new_quantized(w, fmt, block, shards)


@define("quantize_weight_into", QW_INTO_SCHEMA, mutates_args=("qweight", "scale"))
def _quantize_weight_into(w, qweight, scale, scheme, block_shape=None, shards=1):
    quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton=True)


@_quantize_weight_into.register_kernel("cpu")
def _quantize_weight_into_cpu(w, qweight, scale, scheme, block_shape=None, shards=1):
    quantize_into(w, qweight, scale, scheme, block_shape, shards, on_triton=use_triton_on_cpu())


@_quantize_weight_into.register_fake
def _quantize_weight_into_fake(w, qweight, scale, scheme, block_shape=None, shards=1):
    check_quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)


def check_quantize_activation(x, scheme, group_size) -> ActivationQuant:
    C.check_tensor(x, "x", dim=2, dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    aq = get_activation_quant(scheme)
    C.check(group_size >= 1, f"group_size must be >= 1, got {group_size}")
    return aq


def quantize_act(x, scheme, group_size, on_triton):
    aq = check_quantize_activation(x, scheme, group_size)
    if on_triton:
        from .._kernels import activation as kernels

        return kernels.quantize_activation(x, aq, group_size)
    return aq.quantize(x, group_size)


@define("quantize_activation", QA_SCHEMA)
def _quantize_activation(x, scheme, group_size=128):
    return quantize_act(x, scheme, group_size, on_triton=True)


@_quantize_activation.register_kernel("cpu")
def _quantize_activation_cpu(x, scheme, group_size=128):
    return quantize_act(x, scheme, group_size, on_triton=use_triton_on_cpu())


@_quantize_activation.register_fake
def _quantize_activation_fake(x, scheme, group_size=128):
    aq = check_quantize_activation(x, scheme, group_size)
    T, K = x.shape
    return (x.new_empty((T, K), dtype=FP8_DTYPE),
            x.new_empty((T, aq.scale_cols(K, group_size)), dtype=torch.float32))


def quantize_weight(
    w: torch.Tensor, scheme: str, *, block_shape: list[int] | None = None, shards: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize expert weights; one pass on the GPU.

    Args:
        w: [E, N, K] or [N, K] bf16/fp16/fp32, last dim contiguous.
        scheme: ``fp8_tensor`` | ``fp8_channel`` | ``fp8_block`` | ``int8_channel`` | ``int4_group`` | ``mxfp4``
            (docs/design.md §3).
        block_shape: the scale tile: [bn, bk] for fp8_block (default [128, 128]; N and K need not be
            multiples); [1, G] for int4_group (G in {32, 64, 128}, default [1, 128]; K % G == 0); mxfp4:
            [1, 32] only (K % 32 == 0).
        shards: fp8_tensor only: one scale per contiguous row shard (w13 with shards=2: gate and up).

    Returns:
        qweight: float8_e4m3fn [.., N, K] (fp8), int8 [.., N, K] (int8_channel), or uint8 [.., N, K // 2]
            (int4_group: element 2j in the low nibble, 2j + 1 in the high one, two's complement; mxfp4: E2M1
            codes in the same order).
        scale: fp32; fp8_tensor [E, shards], channel [E, N], fp8_block [E, ceil(N/bn), ceil(K/bk)],
            int4_group [E, N, K // G] (no E for 2-D w). fp8/int8: ``scale = max(amax, 1e-4) / QMAX``;
            int4: ``scale = amax / 7`` (an all-zero group gets scale 0 and q 0). Never NaN for finite w.
            mxfp4: uint8 E8M0 bytes [E, N, K // 32], ``2^(s - 127)`` with ``s = floor(log2(amax)) - 2 + 127``
            (OCP MX; docs/design.md §3).
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
