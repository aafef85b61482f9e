"""torch.compile sees through the CUDA ops down to their Triton launches (docs/host-overhead.md).

An opaque custom op costs a compiled graph the dispatcher, our Python and Triton's launch path on every call.
Instead, when AOTAutograd functionalizes a graph (``FunctionalTensorMode``), ``decompose(op, sig, body)``
runs the op's CUDA implementation once, at trace time, on the graph's fake tensors, with every
``_kernels.plan.launch`` turned into a ``torch.library.wrap_triton`` call: the graph then holds the Triton
kernels themselves (``triton_kernel_wrapper_functional`` nodes), which Inductor compiles and launches from its
generated code like its own kernels, and the checks, name lookups and tile choices ran once, while tracing.
The same mechanism as ``torch.library.triton_op``, which cannot keep the CPU kernels and the other
devices on their own paths.

The op stays opaque (its registered kernel is called at run time, launch plans and all) for CPU tensors,
with ``TORCH_MOE_OPS_COMPILE_KERNELS=0``, in debug mode (value checks must run on every call), under
``torch.export`` (an exported program keeps the op, as with ``triton_op``), without Triton, and for an
unbacked token count (``mark_unbacked``: one graph for every T, so the tiles are picked per call).

Tile choices depend on the token count through ``configs.token_bucket`` only, so a graph traced with a
symbolic T (``dynamic=True``) carries guards ``2^(j-1) < T <= 2^j`` and launches, for each T it accepts, what
eager launches; a new bucket retraces.
"""
from __future__ import annotations

import torch

from .. import _platform
from .._kernels.plan import traced_launches


def _decomposing(types, a, sig) -> bool:
    if not (_platform.compile_kernels() and _platform.has_triton()) or _platform.debug_checks():
        return False
    from torch._functorch import config

    if _platform.interpret_mode() or not getattr(config, "decompose_custom_triton_ops", True):
        return False  # the interpreter; torch.export keeps custom ops whole
    first = getattr(a, sig.tensors[0])
    if not isinstance(first, torch.Tensor) or first.device.type != "cuda":
        return False
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    # An unbacked T (mark_unbacked: one graph for every T) has no value to pick tiles by: the op stays opaque
    # and picks them per call.
    return not free_unbacked_symbols(first.shape[0])


#: Arguments whose dim 0 is the token count (symbolic under dynamic=True); every other size is a constant.
TOKEN_DIM0 = frozenset({"hidden_states", "router_logits", "topk_weights", "topk_ids"})


def _specialize_features(a, sig) -> None:
    """Guard every size but the token count to its value (``int()`` on a SymInt): the weights' and feature
    dims pick kernels, tiles and constexprs, so they are constants of the graph. (Parameters and buffers are
    static already; a weight captured by a compiled closure is not, under dynamic=True.)"""
    for name in sig.tensors:
        t = getattr(a, name)
        if t is not None:
            for i, size in enumerate(t.shape):
                if isinstance(size, torch.SymInt) and not (i == 0 and name in TOKEN_DIM0):
                    int(size)


def decompose(op, sig, body) -> None:
    """Register, for the custom op ``op`` with signature ``sig``, the functionalization rule that traces
    ``body(a, True)`` (its CUDA implementation, a function of ``sig.Args``) into the graph."""
    from torch._library.utils import fill_defaults
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    known = (torch.Tensor, FakeTensor, FunctionalTensor)

    def rule(mode, overload, types, args, kwargs):
        if any(not issubclass(t, known) for t in types):
            return NotImplemented  # a tensor subclass: let it handle the op first
        positional, keyword_only = fill_defaults(overload._schema, args, kwargs)
        a = sig.bind(positional, keyword_only)
        if not _decomposing(types, a, sig):
            return mode.__torch_dispatch__(overload, types, args, kwargs)
        _specialize_features(a, sig)
        with mode, traced_launches():
            return body(a, True)

    op.register_torch_dispatch(FunctionalTensorMode, rule)
