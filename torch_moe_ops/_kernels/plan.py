"""Launch plans (docs/host-overhead.md): the Triton launches of one CUDA op call, recorded once per call
signature and replayed without Triton's per-launch argument binding, the Python checks or the tile-config
lookups.

Every launcher in ``_kernels`` launches through ``launch()``. The first call of a signature runs the ordinary
path under a ``Recorder``: ``launch()`` keeps each compiled kernel, its grid and its full argument list, and a
``TorchDispatchMode`` sees every aten op of the call: allocations (and zero fills of them) are recorded, view
ops are free, anything else (a compute op in torch) makes the signature unplannable, and it keeps the ordinary
path. A tensor argument of a launch is recorded as (base, byte offset), a base being one of the call's input
tensors or one of its allocations.

Replay: one workspace allocation holds every intermediate (256-byte aligned slices, so pointer alignment, and
with it Triton's specialization, is what it was when recorded), each output is allocated on its own, zeroed
regions are cleared, and each kernel is launched through its compiled launcher with raw pointers (ints: the
launcher then skips its pointer-attribute query). Same key, same shapes, strides, dtypes, scalars and input
alignment, hence the same argument values, grids and specializations the ordinary path would compute.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._platform import direct_launch

_state = threading.local()
_ALIGN = 256  # workspace slice alignment (the caching allocator's is 512; Triton specializes on 16)
aten = torch.ops.aten

#: aten ops that only make views (no memory traffic): free inside a recorded call.
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.as_strided.default, aten.select.int, aten.slice.Tensor,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.permute.default,
          aten.t.default, aten.transpose.int, aten.detach.default, aten.alias.default, aten.split.Tensor,
          aten.unbind.int, aten.view.dtype, aten._reshape_alias.default}
_EMPTY = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
          aten.new_empty_strided.default, aten.empty_like.default}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_FILLS = {aten.zero_.default, aten.fill_.Scalar}


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; recorded when a ``Recorder`` is active on this thread, and traced
    for Inductor (``torch.library.wrap_triton``) inside ``traced_launches()``."""
    if getattr(_state, "traced", False):
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
        return None
    compiled = kernel[grid](*args, **kwargs)
    rec = getattr(_state, "recorder", None)
    if rec is not None:
        rec.add_launch(kernel, compiled, grid, args, kwargs)
    return compiled


def tracing() -> bool:
    """Whether ``launch()`` is tracing for Inductor on this thread (``traced_launches``): launch options that
    ``wrap_triton`` does not take (``launch_pdl``) must not be asked for then."""
    return getattr(_state, "traced", False)


@contextlib.contextmanager
def traced_launches():
    """Inside, ``launch()`` records each launch into the graph being traced (a ``triton_kernel_wrapper``
    node that Inductor compiles and launches itself) instead of launching it: the ops' decomposition under
    ``torch.compile`` (ops/decompose.py, docs/host-overhead.md)."""
    prev = getattr(_state, "traced", False)
    _state.traced = True
    try:
        yield
    finally:
        _state.traced = prev


class _Unplannable(Exception):
    pass


@dataclass
class _Launch:
    call: object  # (grid x, y, z, stream, function, *args): the compiled kernel's launcher
    function: object
    grid: tuple[int, int, int]
    args: list  # the launcher's arguments after ``function``, kernel arguments (constexprs included) last;
    #             tensor slots hold None until replay
    slots: tuple[tuple[int, int, int], ...]  # (position in args, base, byte offset)


def _launcher(compiled) -> tuple[object, tuple]:
    """The callable a replay launches through and the arguments it takes before the kernel's own.

    ``CompiledKernel.run(grid, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args)`` is
    Triton's public path. Triton 3.6's ``CudaLauncher.__call__`` only allocates scratch (none for kernels that
    need none) and calls its C ``launch``: for such kernels the replay calls ``launch`` itself (a Python frame
    and two closures less per launch). Recognized by ``__call__``'s exact parameters; anything else (other
    Triton versions, kernels with scratch) keeps ``run``. ``TORCH_MOE_OPS_DIRECT_LAUNCH=0`` (read when a
    plan is made) keeps ``run``."""
    run = compiled.run
    head = (compiled.packed_metadata, None, None, None)
    if not direct_launch():
        return run, head
    try:
        import inspect

        params = list(inspect.signature(type(run).__call__).parameters)
        direct = (params == ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]
                  and run.global_scratch_size == 0 and run.profile_scratch_size == 0 and callable(run.launch))
    except (AttributeError, TypeError, ValueError):
        direct = False
    if direct:
        return run.launch, (run.launch_cooperative_grid, run.launch_pdl, None, None, *head)
    return run, head


class Recorder(TorchDispatchMode):
    """Active during one ordinary call: collects launches, allocations and zero fills."""

    def __init__(self):
        super().__init__()
        self.launches: list[tuple] = []  # (kernel, compiled, grid, bound args)
        self.allocs: list[torch.Tensor] = []
        self.zeroed: set[int] = set()  # alloc indices zero-filled before any launch used them
        self.used: set[int] = set()  # alloc indices some launch has been given
        self.problem: str | None = None

    def __enter__(self):
        _state.recorder = self
        return super().__enter__()

    def __exit__(self, *exc):
        _state.recorder = None
        return super().__exit__(*exc)

    def _alloc_index(self, t) -> int | None:
        for i, a in enumerate(self.allocs):
            if a is t or (_storage_ptr(a) == _storage_ptr(t) != 0):
                return i
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY or func in _ZEROS:
            self.allocs.append(out)
            if func in _ZEROS:
                self._zero(out)
        elif func in _FILLS and (func is aten.zero_.default or args[1] == 0):
            self._zero(args[0])
        elif func in _VIEWS or (not func._schema.is_mutable and _aliases_first_input(out, args)):
            pass  # a view (e.g. a reshape that needed no copy): no memory traffic
        elif self.problem is None:
            self.problem = f"aten op {func} inside the call"
        return out

    def _zero(self, t) -> None:
        i = self._alloc_index(t)
        whole = i is not None and t.data_ptr() == self.allocs[i].data_ptr() and t.numel() == self.allocs[i].numel()
        if not whole or i in self.used:  # a fresh buffer's fill can move to the start of the replay
            self.problem = self.problem or "a zero fill of part of a buffer, or of one a launch already used"
        else:
            self.zeroed.add(i)

    def add_launch(self, kernel, compiled, grid, args, kwargs) -> None:
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            self.problem = self.problem or "no compiled kernel (interpreter?)"
            return
        params = kernel.signature.parameters
        bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        if callable(grid):
            grid = grid(bound.arguments)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        values = list(bound.arguments.values())
        self.used.update(i for v in values if isinstance(v, torch.Tensor) and (i := self._alloc_index(v)) is not None)
        self.launches.append((compiled, grid, values))

    def plan(self, inputs: list, out) -> "Plan | None":
        """The plan of the recorded call returning ``out`` (a tensor or a tuple), or None when it cannot be
        replayed."""
        try:
            if self.problem is not None:
                raise _Unplannable(self.problem)
            return Plan(self, inputs, out if isinstance(out, tuple) else (out,), isinstance(out, tuple))
        except _Unplannable:
            return None


def _aliases_first_input(out, args) -> bool:
    """Every tensor ``out`` holds shares the first argument's storage: a view, no memory traffic."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if src is None or not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        return False
    return all(_storage_ptr(o) == _storage_ptr(src) for o in outs)


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Plan:
    """The replayable form of one recorded call (see the module docstring)."""

    def __init__(self, rec: Recorder, inputs: list, outputs: tuple, tuple_out: bool = False):
        self.tuple_out = tuple_out
        n_in = len(inputs)
        if not outputs or any(a.device != outputs[0].device for a in rec.allocs):
            raise _Unplannable("an allocation on another device than the output (one workspace serves them all)")
        out_allocs = []
        for o in outputs:
            i = rec._alloc_index(o)
            if (i is None or o.storage_offset() != 0
                    or o.untyped_storage().nbytes() != rec.allocs[i].untyped_storage().nbytes()):
                raise _Unplannable("an output that is not a whole allocation of the call")
            out_allocs.append(i)
        # Workspace layout: zeroed allocations first (one memset), then the rest; outputs on their own.
        order = sorted((i for i in range(len(rec.allocs)) if i not in out_allocs), key=lambda i: i not in rec.zeroed)
        offsets, size, zero_bytes = {}, 0, 0
        for i in order:
            offsets[i] = size
            size += -(-rec.allocs[i].untyped_storage().nbytes() // _ALIGN) * _ALIGN
            if i in rec.zeroed:
                zero_bytes = size
        self.workspace_bytes, self.zero_bytes = size, zero_bytes
        self.outputs = tuple((tuple(rec.allocs[i].shape), rec.allocs[i].stride(), rec.allocs[i].dtype,
                              i in rec.zeroed) for i in out_allocs)
        self.device = outputs[0].device
        # Bases at replay: inputs (0..n_in-1), the workspace (n_in), the outputs (n_in + 1 + j).
        where = {}  # alloc index -> (base, offset)
        for i, off in offsets.items():
            where[i] = (n_in, off)
        for j, i in enumerate(out_allocs):
            where[i] = (n_in + 1 + j, 0)
        in_storage = {}
        for j, t in enumerate(inputs):
            if t is not None and t.untyped_storage().nbytes():
                if _storage_ptr(t) in in_storage:
                    raise _Unplannable("two inputs share a storage")
                in_storage[_storage_ptr(t)] = j
        self.launches = []
        for compiled, grid, args in rec.launches:
            slots = []
            for pos, a in enumerate(args):
                if not isinstance(a, torch.Tensor):
                    continue
                if a.untyped_storage().nbytes() == 0:
                    args[pos] = 0
                    continue
                j = in_storage.get(_storage_ptr(a))
                if j is not None:
                    slots.append((pos, j, a.data_ptr() - inputs[j].data_ptr()))
                else:
                    i = rec._alloc_index(a)
                    if i is None:  # a tensor made before the call (e.g. a cached constant): keep it alive
                        continue
                    base, off = where[i]
                    slots.append((pos, base, off + a.data_ptr() - rec.allocs[i].data_ptr()))
                args[pos] = None
            call, head = _launcher(compiled)
            n = len(head)
            self.launches.append(_Launch(call, compiled.function, grid, [*head, *args],
                                         tuple((pos + n, base, off) for pos, base, off in slots)))

    def bind(self, inputs: list) -> tuple[list, list, object]:
        """Fresh buffers for one replay: (outputs, the base pointers the slots index, the workspace)."""
        dev = self.device
        ws = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=dev) if self.workspace_bytes else None
        outs = [_alloc(shape, stride, dtype, zero, dev) for shape, stride, dtype, zero in self.outputs]
        if self.zero_bytes:
            ws[: self.zero_bytes].zero_()
        ptrs = [t.data_ptr() if t is not None else 0 for t in inputs]
        ptrs.append(ws.data_ptr() if ws is not None else 0)
        ptrs.extend(o.data_ptr() for o in outs)
        return outs, ptrs, ws

    def replay(self, inputs: list):
        dev = self.device
        outs, ptrs, _ws = self.bind(inputs)
        stream = torch._C._cuda_getCurrentRawStream(dev.index) if dev.type == "cuda" else 0
        for ln in self.launches:
            args = ln.args.copy()
            for pos, base, off in ln.slots:
                args[pos] = ptrs[base] + off
            g0, g1, g2 = ln.grid
            ln.call(g0, g1, g2, stream, ln.function, *args)
        return outs


def _alloc(shape, stride, dtype, zero, dev):
    t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
    return t.zero_() if zero else t


_knobs = []  # triton.knobs, looked up on the first replay (not on import: CPU users never load Triton)


def replay_enabled() -> bool:
    """Plans replay unless a Triton launch hook (a profiler such as proton) wants to see every launch."""
    if not _knobs:
        try:
            from triton import knobs
        except ImportError:  # older Triton: no hooks API to respect
            knobs = None
        _knobs.append(knobs)
    knobs = _knobs[0]
    return knobs is None or (_no_hook(knobs.runtime.launch_enter_hook) and _no_hook(knobs.runtime.launch_exit_hook))


def _no_hook(h) -> bool:
    """None (older Triton) or an empty ``HookChain`` (3.6+: always set, called on every launch)."""
    return h is None or not getattr(h, "calls", True)


class PlanCache:
    """signature key -> Plan (None: this signature cannot be replayed). Bounded: the oldest entries go first."""

    def __init__(self, size: int = 512):
        self.size = size
        self.plans: dict = {}

    def put(self, key, plan) -> None:
        if len(self.plans) >= self.size:
            self.plans.pop(next(iter(self.plans)))
        self.plans[key] = plan

    def clear(self) -> None:
        self.plans.clear()


_MISSING = object()


def run_planned(cache: PlanCache, key, inputs: list, fn):
    """``fn()`` (the ordinary path of one CUDA call, returning a tensor or a tuple of tensors) through the plan
    of ``key``: recorded on the first call of the key, replayed afterwards. ``inputs``: every tensor argument
    of the call (None for absent ones), in a fixed order; ``key`` must determine everything else."""
    plan = cache.plans.get(key, _MISSING)
    if getattr(_state, "recorder", None) is not None:  # inside another call's recording: no nested plans
        return fn()
    if plan is _MISSING:
        with Recorder() as rec:
            out = fn()
        cache.put(key, rec.plan(inputs, out))
        return out
    if plan is None or not replay_enabled():
        return fn()
    outs = plan.replay(inputs)
    return outs[0] if len(outs) == 1 and not plan.tuple_out else tuple(outs)
