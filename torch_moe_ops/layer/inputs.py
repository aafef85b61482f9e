"""``FusedMoE``'s input rules (docs/design.md §10.2): token tensors with any leading dims, and the dtype of
the activations.

The layer's ops take ``[T, H]`` / ``[T, E]`` / ``[T, k]``; the layer accepts ``[..., H]`` (at least one
leading dim) and flattens with ``reshape`` (a view for contiguous inputs; no host sync, so a compiled graph
stays symbolic in every leading dim). Errors name the argument and the layer, before any op runs. Checks
read shapes and dtypes only: under ``torch.compile`` they are decided at trace time (a dtype is static) or
become runtime asserts for symbolic sizes, never a graph break.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops._checks import FLOAT_DTYPES as ACTIVATION_DTYPES  # what every scheme computes in (the ops' rule)
from ..ops._checks import INDEX_DTYPES

#: the dtypes the ops take for each token tensor, checked here too so that the message names the layer
_DTYPES = {"router_logits": ACTIVATION_DTYPES, "topk_weights": ACTIVATION_DTYPES, "topk_ids": INDEX_DTYPES}


def _require(cond, message: Callable[[], str], got: Callable[[], str]) -> None:
    """``ValueError(message() + got())`` when ``cond`` is false (messages are built only then). Traced by
    Dynamo, it is ``torch._check(cond)``: a guard, or a runtime assert for unbacked sizes. Its message is a
    constant: torch 2.11's Dynamo refuses a message function that closes over anything, and any type test
    of a symbolic ``cond`` would specialise it."""
    if torch.compiler.is_compiling():
        torch._check(cond, lambda: "FusedMoE: hidden_states must be [..., H] and router_logits / topk_weights / "
                                   "topk_ids [..., E | k] with the same leading dims")
    elif not cond:
        raise ValueError(message() + got())


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_hidden(where: Callable[[], str], x, hidden_size: int, compute_dtype: torch.dtype | None) -> None:
    """x: [..., H] (dim >= 2); ``where()`` names the layer in messages. ``compute_dtype``: the one dtype the
    layer computes in (unquantized: its weights' dtype, which the op requires of x), or None: any of
    ``ACTIVATION_DTYPES`` (quantized layers: the ops accept each of them, the biases in any float dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where()}: hidden_states must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{where()}: hidden_states must be [..., H={hidden_size}] with at least one leading (token) "
                         f"dim, got shape {_shape(x)}")
    _require(x.shape[-1] == hidden_size, lambda: f"{where()}: hidden_states must be [..., H={hidden_size}]",
             lambda: f", got shape {_shape(x)}")
    if compute_dtype is not None and x.dtype != compute_dtype:
        raise TypeError(f"{where()}: hidden_states has dtype {x.dtype} but the layer computes in params_dtype "
                        f"{compute_dtype}: cast the input (hidden_states.to({compute_dtype})) or build the layer "
                        f"with params_dtype={x.dtype}")
    if compute_dtype is None and x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{where()}: hidden_states has dtype {x.dtype}; a quantized layer computes in bfloat16, "
                        "float16 or float32 activations: cast the input")


def check_like(where: Callable[[], str], t, name: str, x: torch.Tensor, last: int | None, last_name: str) -> None:
    """t: [..., last] with the leading shape of ``x`` (hidden_states); ``last`` None: any size. ``name``
    picks the dtypes the ops take (``_DTYPES``; others: any)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where()}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = _DTYPES.get(name)
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{where()}: {name} must have dtype in ({names}), got {t.dtype}")

    def message():
        return f"{where()}: {name} must be [..., {last_name}] with the leading dims of hidden_states"

    def got():
        return f" {_shape(x)}, got shape {_shape(t)}"

    if t.dim() != x.dim():
        raise ValueError(message() + got())
    for a, b in zip(t.shape[:-1], x.shape[:-1]):
        _require(a == b, message, got)
    if last is not None:
        _require(t.shape[-1] == last, message, got)


def tokens(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] (the tensor itself when it has 2 dims or fewer: the op then names a 1-D one)."""
    return t if t.dim() <= 2 else t.reshape(-1, t.shape[-1])


def restore(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N, D] -> ``like``'s leading dims and D."""
    return out if like.dim() <= 2 else out.reshape(*like.shape[:-1], out.shape[-1])


__all__ = ["ACTIVATION_DTYPES", "INDEX_DTYPES", "check_hidden", "check_like", "restore", "tokens"]
