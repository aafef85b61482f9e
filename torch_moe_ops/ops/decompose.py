"""What a torch.compile graph calls for the CUDA expert ops (docs/host-overhead.md, "Inside torch.compile").

The public ops are ``custom_op``s: inside a compiled graph each call costs the dispatcher with its Python
autograd and wrapper layers (~13 µs on an H200 host) before our kernel starts. So when AOTAutograd functionalizes
a graph (``FunctionalTensorMode``), ``decompose(op, sig, body, inference)`` replaces a CUDA call by, per
``TORCH_MOE_OPS_COMPILE`` (read at trace time):

- ``plans`` (default): the lean inference twin ``moe::_<name>_inference`` (``Signature.define_inference``:
  a plain ``torch.library`` op, CUDA kernel and fake only, its tensors positional and every other argument in
  one string, so that Inductor's call passes no keyword), whose kernel is the public op's: checks and launch
  plan on its first call of a signature, replay after. The rule runs below autograd (inside the public op's
  autograd forward in a training graph), so gradients still come from the public op's formula.
- ``triton``: the op's CUDA path run once, at trace time, on the graph's fake tensors, with every
  ``_kernels.plan.launch`` turned into ``torch.library.wrap_triton`` (the mechanism of
  ``torch.library.triton_op``): the graph holds the Triton kernels, which Inductor compiles and launches from
  its generated code. Tile choices depend on T through ``configs.token_bucket`` only, so a symbolic T is
  guarded to its bucket (one graph per bucket) and eager and compiled launch the same kernels.
- ``opaque``: the public op.

CPU tensors, debug mode (value checks run on every call), ``torch.export`` (an exported program keeps the op,
as with ``triton_op``) and, for ``triton``, an unbacked token count (``mark_unbacked``: no value to pick tiles
by) and a missing Triton keep the public op.
"""
from __future__ import annotations

import torch

from .. import _platform
from .._kernels.plan import traced_launches

#: Arguments whose dim 0 is the token count (symbolic under dynamic=True); every other size is a constant.
TOKEN_DIM0 = frozenset({"hidden_states", "router_logits", "topk_weights", "topk_ids"})


def _mode(a, sig) -> str:
    """The compile mode for this call: ``_platform.compile_mode()`` unless the call must keep the public op."""
    from torch._functorch import config

    first = getattr(a, sig.tensors[0])
    if (_platform.debug_checks() or _platform.interpret_mode() or not isinstance(first, torch.Tensor)
            or first.device.type != "cuda" or not getattr(config, "decompose_custom_triton_ops", True)):
        return "opaque"
    mode = _platform.compile_mode()
    if mode == "triton":
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

        if not _platform.has_triton() or free_unbacked_symbols(first.shape[0]):
            return "opaque"
    return mode


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


def decompose(op, sig, body, inference=None) -> None:
    """Register, for the custom op ``op`` with signature ``sig``, the functionalization rule above: ``body(a,
    True)`` is its CUDA implementation (a function of ``sig.Args``), ``inference`` its lean twin's
    ``OpOverload`` (None: ``plans`` keeps the public op)."""
    from torch._library.utils import fill_defaults
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def rule(mode, overload, types, args, kwargs):
        # Any other tensor subclass (DTensor, a torchao weight, ...) handles the op first (every subclass is a
        # torch.Tensor subclass, hence the exact test; as in torch.library.triton_op).
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented
        positional, keyword_only = fill_defaults(overload._schema, args, kwargs)
        a = sig.bind(positional, keyword_only)
        how = _mode(a, sig)
        if how == "plans" and inference is not None:
            with mode:
                return inference(*sig.inference_args(a))
        if how != "triton":
            return mode.__torch_dispatch__(overload, types, args, kwargs)
        _specialize_features(a, sig)
        with mode, traced_launches():
            return body(a, True)

    op.register_torch_dispatch(FunctionalTensorMode, rule)
