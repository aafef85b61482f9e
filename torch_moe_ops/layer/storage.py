"""``FusedMoE``'s tensors (docs/design.md §2, §10.1): what they are, ``nn.Module``'s conversions (``to`` /
``half`` / ``float`` / ``to_empty`` / ``cuda``), ``reset_parameters`` and ``load_state_dict``'s checks.

Functions of a ``LayerSpec`` and of the layer's ``_parameters`` dict; the layer's ``_apply``, ``reset_parameters``
and ``_load_from_state_dict`` call them (the placement buffers are ``tables.py``'s). Parameters (``spec``'s
sizes; N1 = 2I gated, I otherwise; E the local experts):

- ``w13_weight`` [E, N1, H] (gated: rows [0, I) gate, [I, 2I) up, interleaved for ``swigluoai``), ``w2_weight``
  [E, H, I]. With a quant config these hold the format's storage (``quant_config.storage_shape``: fp8 / int8
  ``[E, N, K]``, int4 two per byte ``[E, N, K // 2]`` uint8), allocated on the target device at construction,
  at their final addresses; the full-precision weights then exist only as meta tensors (``full_precision``).
- ``w13_weight_scale`` / ``w2_weight_scale`` (fp32, quantized only): ``quant_config.scale_shape``
  (docs/design.md §3): fp8 tensor [E, 2] (gate, up; [E, 1] interleaved or non-gated) and [E]; channel [E, N1]
  and [E, H]; fp8 block [E, ceil(N1/bn), ceil(H/bk)] and [E, ceil(H/bn), ceil(I/bk)]; int4 [E, N1, H // G]
  and [E, H, I // G].
- ``w13_bias`` [E, N1], ``w2_bias`` [E, H] (``has_bias``), ``e_score_correction_bias`` [E_logical] fp32.

- **Meta construction.** A layer built under ``torch.device("meta")`` holds no data. ``to_empty(device=...)``
  gives it its final storage; ``_apply`` then calls ``reset_parameters``: biases and the correction bias zero,
  scales one, placement tables as at construction, ``expert_load`` zero, and a fresh load state.
- **dtype casts never touch quantized data.** ``model.to(torch.bfloat16)``, ``half()``, ``float()`` cast
  every floating tensor, fp8 storage included. ``dtype_guard`` keeps the dtype of a quantized layer's weights
  and scales and of ``e_score_correction_bias`` (probing ``fn`` on an empty tensor tells its device part from
  its dtype part): a device move still happens; without one the tensor is kept as it is (every ``data_ptr``
  too). Everything else follows the cast, and ``params_dtype`` follows it.
- **Copies and state dicts.** ``copy.deepcopy`` / unpickling and ``load_state_dict(assign=True)`` re-attach
  ``weight_loader`` to the new Parameters (``assign`` also moves ``params_dtype`` to the assigned tensors'); a
  state whose quantized storage has another dtype (int8 vs fp8 have the same shapes) is refused unwritten.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

from .loading import LOADABLE
from .spec import PARAMS_DTYPES, LayerSpec

#: parameters whose dtype a cast never changes, always / in quantized layers (storage, then scales)
_KEEP_DTYPE = ("e_score_correction_bias",)
_KEEP_DTYPE_QUANTIZED = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")


# ------------------------------------------------------------------------------------------ construction
def make_parameters(spec: LayerSpec, dev: torch.device) -> dict[str, nn.Parameter | None]:
    """Every parameter of the layer in registration order (None: absent), allocated on ``dev``."""
    qc, dtype = spec.quant_config, spec.params_dtype
    E, N1, H, I = spec.num_local_experts, spec.n1, spec.hidden_size, spec.intermediate_size

    def param(t):
        return nn.Parameter(t, requires_grad=False)

    out: dict[str, nn.Parameter | None] = {}
    if qc is None:
        out["w13_weight"] = param(torch.empty(E, N1, H, dtype=dtype, device=dev))
        out["w2_weight"] = param(torch.empty(E, H, I, dtype=dtype, device=dev))
        out["w13_weight_scale"] = out["w2_weight_scale"] = None
    else:
        wdtype = qc.weight_dtype()
        out["w13_weight"] = param(torch.empty(qc.storage_shape(E, N1, H), dtype=wdtype, device=dev))
        out["w2_weight"] = param(torch.empty(qc.storage_shape(E, H, I), dtype=wdtype, device=dev))
        # per-tensor formats: one w13 scale per gate/up half, and w2 scales [E]
        s13 = qc.scale_shape(E, N1, H, spec.layout.w13_shards)
        s2 = qc.scale_shape(E, H, I, 0 if qc.quant_scheme.weight.sharded else 1)
        fmt = qc.quant_scheme.weight  # scales in the format's storage (fp32, or mxfp4's E8M0 bytes), "one" each
        out["w13_weight_scale"] = param(torch.full(s13, fmt.codec.scale_one, dtype=fmt.scale_dtype, device=dev))
        out["w2_weight_scale"] = param(torch.full(s2, fmt.codec.scale_one, dtype=fmt.scale_dtype, device=dev))
    biases = spec.has_bias
    out["w13_bias"] = param(torch.zeros(E, N1, dtype=dtype, device=dev)) if biases else None
    out["w2_bias"] = param(torch.zeros(E, H, dtype=dtype, device=dev)) if biases else None
    # routing bias: one per logical expert, never sharded
    out["e_score_correction_bias"] = (param(torch.zeros(spec.num_experts, dtype=torch.float32, device=dev))
                                      if spec.use_correction_bias else None)
    return out


def full_precision(spec: LayerSpec, params: Mapping) -> dict[str, torch.Tensor]:
    """The model-format (checkpoint) weights the loader accepts as ``param``: the parameters themselves
    (unquantized), else meta tensors in ``params_dtype`` (shape and dtype, no memory)."""
    if spec.quant_config is None:
        return {"w13_weight": params["w13_weight"], "w2_weight": params["w2_weight"]}
    E, N1, H, I = spec.num_local_experts, spec.n1, spec.hidden_size, spec.intermediate_size
    return {"w13_weight": torch.empty(E, N1, H, dtype=spec.params_dtype, device="meta"),
            "w2_weight": torch.empty(E, H, I, dtype=spec.params_dtype, device="meta")}


def attach_weight_loader(params: Mapping, weight_loader: Callable) -> None:
    """``param.weight_loader`` (vLLM-style loaders call it) on the current Parameter objects."""
    for name in LOADABLE:  # what the checkpoint fills through weight_loader
        p = params.get(name)
        if p is not None:
            p.weight_loader = weight_loader


@torch.no_grad()
def reset(spec: LayerSpec, params: Mapping) -> None:
    """The parameters other than the expert weights as at construction, in place (every ``data_ptr`` is kept):
    biases and the correction bias zero, scales one (as the format stores one: mxfp4's E8M0 byte 127)."""
    for name in ("w13_bias", "w2_bias", "e_score_correction_bias"):
        if params.get(name) is not None:
            params[name].zero_()
    for name in ("w13_weight_scale", "w2_weight_scale"):
        if params.get(name) is not None:
            params[name].fill_(spec.quant_config.quant_scheme.weight.codec.scale_one)


# ------------------------------------------------------------------------------------------ dtype casts
def kept_dtype(spec: LayerSpec) -> tuple[str, ...]:
    """Parameters whose dtype never changes (their values are codes or fp32 scales)."""
    return _KEEP_DTYPE + (_KEEP_DTYPE_QUANTIZED if spec.quant_config is not None else ())


def cast_dtype(fn: Callable, params_dtype: torch.dtype, device: torch.device, where: Callable[[], str]):
    """The ``params_dtype`` that ``fn`` (``nn.Module._apply``'s) casts to (None: no cast); ``TypeError`` for
    one the layer cannot compute in (``double()``, ``type(torch.int8)``), before anything is converted."""
    probe = fn(torch.empty(0, dtype=params_dtype, device=device))
    if probe.dtype == params_dtype:
        return None
    if probe.dtype not in PARAMS_DTYPES:
        raise TypeError(f"{where()}: cannot convert the layer to {probe.dtype}: params_dtype must be "
                        "bfloat16, float16 or float32 (nothing of this layer was converted)")
    return probe.dtype


def dtype_guard(fn: Callable, params: Mapping, kept: tuple[str, ...]) -> tuple[Callable, dict]:
    """``fn`` for ``nn.Module._apply`` without the dtype part for the ``kept`` parameters -> (the guarded
    ``fn``, the parameters to hide from ``_apply`` altogether: only a cast would happen to them, so they are
    kept as they are, address included; see ``hidden``)."""
    hide, moves = {}, {}
    for name in kept:
        t = params.get(name)
        if t is None:
            continue
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        if probe.dtype == t.dtype:
            continue  # fn does not cast it: it applies as it is
        if probe.device == t.device:
            hide[name] = t
        else:
            moves[id(t)] = probe.device

    def guarded(t):
        device = moves.get(id(t))
        return fn(t) if device is None else t.to(device=device)  # the device part only

    return guarded, hide


@contextlib.contextmanager
def hidden(params: dict, hide: Mapping):
    """``params`` without ``hide`` inside the block (works on ``_apply``'s set_data and swap_tensors paths)."""
    for name in hide:
        params[name] = None
    try:
        yield
    finally:
        params.update(hide)


# ------------------------------------------------------------------------------------------ state dicts
def state_dict_problems(spec: LayerSpec, params: Mapping, state_dict, prefix: str, assign: bool,
                        where: Callable[[], str]) -> list[str]:
    """Why ``load_state_dict`` must not touch this layer (checked before it writes anything): quantized
    storage of another dtype (an int8 state into fp8 storage of the same shape would be cast code by code);
    with ``assign=True``, a scale that is not fp32, or full-precision tensors (weights of an unquantized layer,
    biases) that do not share one of bf16 / fp16 / fp32 (the new ``params_dtype``). A correction bias may come
    in any float dtype (transformers' bf16 models hold it in bf16)."""
    problems, kept, quantized = [], kept_dtype(spec), spec.quant_config is not None
    exact = _KEEP_DTYPE_QUANTIZED[:2] if quantized else ()  # quantized storage
    exact += _KEEP_DTYPE_QUANTIZED[2:] if quantized and assign else ()  # assigned scales
    dtypes = {}
    for name, p in params.items():
        t = state_dict.get(prefix + name)
        if p is None or not isinstance(t, torch.Tensor):
            continue
        if name in kept and t.dtype != p.dtype and (name in exact or not t.is_floating_point()):
            problems.append(f"{where()}: {prefix + name} has dtype {t.dtype}, but the layer holds {p.dtype} "
                            f"({spec.quant_scheme} storage and fp32 scales are never cast); build the layer with "
                            "the quant_config that saved the state")
        elif name not in kept:
            dtypes[name] = t.dtype
    if assign and dtypes:
        own = {n: p.dtype for n, p in params.items() if p is not None and n not in kept}
        found = set({**own, **dtypes}.values())
        if len(found) > 1 or not found <= set(PARAMS_DTYPES):
            problems.append(f"{where()}: load_state_dict(assign=True) would leave full-precision tensors of dtypes "
                            f"{sorted(map(str, found))}; they must share one of bf16 / fp16 / fp32")
    return problems


def assigned_dtype(spec: LayerSpec, params: Mapping) -> torch.dtype | None:
    """After ``load_state_dict(assign=True)``: the full-precision tensors' dtype when it is not ``params_dtype``
    (the layer's ``params_dtype`` follows it), else None."""
    kept = kept_dtype(spec)
    own = [p.dtype for n, p in params.items() if p is not None and n not in kept]
    return own[0] if own and own[0] != spec.params_dtype else None


__all__ = ["assigned_dtype", "attach_weight_loader", "cast_dtype", "dtype_guard", "full_precision", "hidden",
           "kept_dtype", "make_parameters", "reset", "state_dict_problems"]
