"""Collision-safe registration of ``moe::`` custom ops, and the CPU/CUDA kernel choice.

``torch.library.custom_op`` silently replaces an op of the same qualified name, and ``moe`` is a popular
namespace, so every definition first checks that the name is free (or ours) and fails loudly otherwise.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _platform

NAMESPACE = "moe"
#: qualified name -> the CustomOpDef we registered.
REGISTERED: dict[str, object] = {}


def _existing_owner(qualname: str) -> str | None:
    """Describe who registered ``qualname`` if it exists and is not ours, else None."""
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return None
    opdef = torch._library.custom_ops.OPDEFS.get(qualname)
    fn = getattr(opdef, "_init_fn", None)
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("torch_moe_ops"):
        return None  # our own op (e.g. the module was reloaded)
    if module:
        return f"the Python module {module!r}"
    dump = torch._C._dispatch_dump(qualname)
    where = [line.split("registered at", 1)[1].strip() for line in dump.splitlines() if "registered at" in line]
    return f"another library (registered at {where[0]})" if where else "another library"


def define(name: str, schema: str, *, mutates_args=()) -> Callable:
    """Decorator: ``custom_op("moe::<name>", schema=...)`` whose body is the CUDA kernel."""
    qualname = f"{NAMESPACE}::{name}"

    def wrap(fn):
        owner = _existing_owner(qualname)
        if owner is not None:
            raise RuntimeError(
                f"torch_moe_ops: the op {qualname} is already registered by {owner}; "
                f"refusing to replace it (import torch_moe_ops before or instead of that library)"
            )
        if qualname in torch._library.custom_ops.OPDEFS:  # reload of our own module: reuse the op
            return REGISTERED.setdefault(qualname, torch._library.custom_ops.OPDEFS[qualname])
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, device_types="cuda", schema=schema)
        REGISTERED[qualname] = op
        return op

    return wrap


_LIBS: list = []  # the Library objects of define_inference (an op lives as long as its Library)
#: qualified name -> OpOverload of the lean inference twins (not custom ops: kept out of REGISTERED).
INFERENCE: dict[str, object] = {}


def define_inference(name: str, schema: str, cuda, fake):
    """A lean op ``moe::<name>`` for compiled inference graphs (ops/decompose.py): a ``torch.library.Library``
    definition with a CUDA kernel and a fake only. No autograd kernel, no ``custom_op`` wrapper: the
    dispatcher reaches ``cuda`` in a few µs. Returns its ``OpOverload``."""
    qualname = f"{NAMESPACE}::{name}"
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:  # free: define it
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.define(name + schema)
        lib.impl(name, cuda, "CUDA")
        torch.library.register_fake(qualname, fake, lib=lib)
        _LIBS.append(lib)
    else:  # a reload of this module keeps the first definition; anything else is a collision
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        if str(op._schema) != str(torch._C.parse_schema(qualname + schema)):
            raise RuntimeError(f"torch_moe_ops: the op {qualname} is already registered with another schema "
                               f"({op._schema}); refusing to replace it")
    INFERENCE[qualname] = getattr(getattr(torch.ops, NAMESPACE), name).default
    return INFERENCE[qualname]


_MARK = "_trace_state"


def _define_mark():
    """``moe::_trace_state(str state) -> ()``: a no-op (Inductor drops it: no output, no side effect) whose
    only job is to put ``_platform.trace_state()`` into a Dynamo graph, hence into the key of torch's
    compiled-artifact caches."""
    qualname = f"{NAMESPACE}::{_MARK}"
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.define(_MARK + "(str state) -> ()")
        lib.impl(_MARK, lambda state: None, "CompositeExplicitAutograd")
        _LIBS.append(lib)
    else:
        schema = str(getattr(getattr(torch.ops, NAMESPACE), _MARK).default._schema)
        if schema != f"{qualname}(str state) -> ()":
            raise RuntimeError(f"torch_moe_ops: the op {qualname} is already registered as {schema}")
    return getattr(getattr(torch.ops, NAMESPACE), _MARK).default


_MARK_OP = _define_mark()


def _exporting() -> bool:
    """``torch.compiler.is_exporting()``, read so that Dynamo sees its real value: torch 2.11's Dynamo folds that
    call to True in every trace, ``torch.compile`` included (later torch reads this flag instead)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def mark_traced() -> None:
    """Called by the public functions and the layer while Dynamo traces them (docs/compile.md, "Caches"); not
    under ``torch.export``, whose program would keep the node (export caches nothing of ours)."""
    if not _exporting():
        _MARK_OP(_platform.trace_state())


def use_triton_on_cpu() -> bool:
    """CPU kernels run the Triton launchers (interpreter) when TORCH_MOE_OPS_BACKEND=triton."""
    return _platform.cpu_backend() == "triton"


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(first: torch.Tensor, *tensors) -> bool:
    """True when a public function may call its op's CUDA kernel itself instead of going through the dispatcher
    (docs/host-overhead.md, "The dispatcher"): ``first`` (the op's first tensor) on CUDA, every tensor a plain
    tensor or parameter (no subclass: FakeTensor, DTensor, ... dispatch), no gradient to record, no Python
    dispatch or function mode, no functorch transform (vmap's batched tensors look plain), no profiler (it
    would miss the op's range), no Dynamo or ``torch.jit.trace``. Unlike the dispatcher, the direct call does
    not coerce argument types to the schema's (the op's own checks still run on a plan's first call). What the
    dispatcher would do then is exactly: call that kernel."""
    if torch.compiler.is_compiling() or type(first) not in _PLAIN or not first.is_cuda:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    if grad and first.requires_grad:
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
                or torch.autograd.profiler._is_profiler_enabled or torch._C._are_functorch_transforms_active()
                or torch._C._get_tracing_state() is not None)  # torch.jit.trace records through the dispatcher
