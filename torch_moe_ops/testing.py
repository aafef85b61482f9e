"""Helpers shared by tests, benchmarks and the demo: error metrics, random weights, per-scheme quantization
of whole expert stacks (asked of the scheme registry), and a timer. Not imported by the package itself."""
from __future__ import annotations

import time

import torch

from .ops import quantize_weight
from .schemes import Activation, QuantScheme, get_activation, get_quant_scheme


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10*log10(|ref|^2 / |ref - test|^2), in dB (inf when equal)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))  # host-ok: test utility


def rel_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """||ref - test|| / ||ref||."""
    ref, test = ref.double(), test.double()
    return float((ref - test).norm() / ref.norm().clamp_min(1e-30))  # host-ok: test utility


def random_moe_weights(E: int, H: int, I: int, *, gated: bool = True, dtype=torch.bfloat16, device="cpu",
                       scale: float = 0.1, bias: bool = False, generator=None):
    """Random expert weights ``randn * scale``: w13 [E, 2I or I, H], w2 [E, H, I], optional biases."""
    n1 = 2 * I if gated else I
    w13 = (torch.randn(E, n1, H, generator=generator) * scale).to(dtype=dtype, device=device)
    w2 = (torch.randn(E, H, I, generator=generator) * scale).to(dtype=dtype, device=device)
    if not bias:
        return w13, w2, None, None
    b13 = (torch.randn(E, n1, generator=generator) * scale).to(dtype=dtype, device=device)
    b2 = (torch.randn(E, H, generator=generator) * scale).to(dtype=dtype, device=device)
    return w13, w2, b13, b2


def w13_shards(scheme: QuantScheme | str, activation: Activation | str = "silu") -> int:
    """Row shards of w13 for ``quantize_weight``: 2 (one scale per gate / up half) when the format keeps a
    scale per shard and the activation's gate and up are the two halves, else 1 (interleaved, non-gated)."""
    scheme, act = get_quant_scheme(scheme), get_activation(activation)
    sharded = scheme.weight is not None and scheme.weight.sharded
    return 2 if sharded and act.gated and not act.interleaved else 1


def fitting_block(scheme: QuantScheme | str, *ks: int) -> tuple[int, int] | None:
    """The scheme's default scale tile, its K halved until the format accepts every GEMM K in ``ks`` (int4
    groups must divide K: H = 256, I = 96 gives [1, 32]); None for schemes without a tile."""
    scheme = get_quant_scheme(scheme)
    if not scheme.tiled:
        return None
    fmt = scheme.weight
    bn, bk = fmt.block_shape(None)
    first_error = None
    while bk >= 1:
        try:
            block = fmt.block_shape((bn, bk))
            for K in ks:
                fmt.check_shape((1, K), block, 1, "w")
            return block
        except ValueError as exc:
            first_error = first_error or exc
        bk //= 2
    raise ValueError(f"{scheme.name}: no scale tile fits K in {list(ks)} ({first_error})")


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, scheme: QuantScheme | str = "none",
                     activation: Activation | str = "silu", block_shape=None):
    """Quantize an expert stack for ``fused_experts(..., quant_scheme=scheme)``.

    w13: [E, N1, H], w2: [E, H, I] float. Returns ``(q13, q2, s13, s2, block)``: the weights in the format's
    storage (int4: uint8 [E, N, K // 2]), fp32 scales, and the scale tile (None when the scheme has none).
    ``none`` returns the weights unchanged with no scales. block_shape None: ``fitting_block(scheme, H, I)``.
    """
    scheme = get_quant_scheme(scheme)
    if scheme.weight is None:
        scheme.block_shape(block_shape)  # raises for a tile given to "none"
        return w13, w2, None, None, None
    if block_shape is None:
        block = fitting_block(scheme, w13.shape[2], w2.shape[2])
    else:
        block = scheme.block_shape(block_shape)
    tile = list(block) if block is not None else None
    name = scheme.weight.name
    q13, s13 = quantize_weight(w13, name, block_shape=tile, shards=w13_shards(scheme, activation))
    q2, s2 = quantize_weight(w2, name, block_shape=tile)
    return q13, q2, s13, s2, block


def experts_kwargs(scheme: QuantScheme | str, s13, s2, block) -> dict:
    """The ``fused_experts`` / ``fused_moe`` keywords for ``quantize_experts``' result ({} for ``none``)."""
    scheme = get_quant_scheme(scheme)
    if scheme.weight is None:
        return {}
    kw = dict(quant_scheme=scheme.name, w13_scale=s13, w2_scale=s2)
    if block is not None:
        kw["block_shape"] = list(block)
    return kw


def time_per_call(fn, iters: int, device: torch.device | str = "cpu") -> float:
    """Seconds per call of ``fn()`` (one warm-up call, then ``iters`` timed; synchronizes on CUDA)."""
    device = torch.device(device)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(iters, 1)


def batch_variance(fn, tokens, sizes=(1, 7, 64), *, trials: int = 2, generator=None) -> dict[int, tuple[int, int]]:
    """Probe of batch invariance (docs/batch-invariance.md): how many output rows change with the company.

    ``fn(*tokens) -> [T, ...]`` where every tensor of ``tokens`` is a per-token input [T, ...] (hidden states,
    router logits, router weights and ids). The whole batch runs once; then, ``trials`` times per size n in
    ``sizes`` (n < T), n rows drawn at random run (a) alone, as a batch of n in a shuffled order, and (b) among
    n other tokens of the batch (rows drawn from the rest), the batch of 2n shuffled. A row counts as differing
    when any of its elements is not bitwise equal to its row in the whole batch (NaNs compare by bits too).

    Returns {n: (rows differing, rows compared)}; all zeros means invariant on these draws."""
    T = tokens[0].shape[0]
    device = tokens[0].device
    full = fn(*tokens)
    out = {}
    for n in sizes:
        if not 0 < n < T:
            raise ValueError(f"batch_variance: sizes must be in [1, T) = [1, {T}), got {n}")
        bad = seen = 0
        for _ in range(trials):
            perm = torch.randperm(T, generator=generator).to(device)
            rows, rest = perm[:n], perm[n:]
            company = rest[torch.randint(rest.numel(), (n,), generator=generator).to(device)]
            for batch in (rows, torch.cat([rows, company])):
                order = torch.randperm(batch.numel(), generator=generator).to(device)
                got = fn(*(t[batch[order]] for t in tokens))
                got = got[torch.argsort(order)][:n]  # back to the order of ``rows``
                same = _bits(got) == _bits(full[rows])
                bad += int((~same.reshape(n, -1).all(1)).sum())  # host-ok: test utility
                seen += n
        out[n] = (bad, seen)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (bitwise comparison: -0.0 != 0.0, equal NaNs equal)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


#: ``torch.library.opcheck``'s default utils.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args, kwargs=None, *, test_utils=OPCHECK_UTILS, **kw):
    """``torch.library.opcheck`` that also works on fp8 inputs (docs/ops.md).

    ``test_schema`` compares every tensor argument before and after the call with ``allclose``, which has no
    Float8 kernel (a torch limitation): when any argument is float8, that one check is skipped (the others
    still run; the uint8-view and int8 forms of the same ops cover their schemas)."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    if any(t.dtype in fp8 for t in tensors):
        test_utils = tuple(u for u in test_utils if u != "test_schema")
    return torch.library.opcheck(op, args, kwargs, test_utils=test_utils, **kw)
