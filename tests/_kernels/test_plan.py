"""Launch plans' record/replay logic on CPU with a stand-in kernel (the CUDA side: tests/_kernels/test_plan_cuda.py).

The stand-in has Triton's surface (``kernel[grid](*args, **kw)`` returning a compiled object whose ``run`` takes
grid, stream, function, metadata, hooks, then every argument) and computes ``out = a * SCALE + b`` over ``n``
fp32 values, reading raw pointers through ctypes on replay: so a wrong pointer, offset or size shows as a wrong
value, not only as a wrong number in a list."""
from __future__ import annotations

import ctypes
import inspect

import numpy as np
import pytest
import torch

from torch_moe_ops._kernels.plan import PlanCache, Recorder, launch, run_planned
from torch_moe_ops._platform import DIRECT_LAUNCH_ENV


def _view(p, n):
    """A tensor (ordinary launch) or a raw pointer (replay) as n fp32 values, without an aten op (a Triton
    kernel is invisible to the recorder's dispatch mode; so is numpy)."""
    if isinstance(p, torch.Tensor):
        return p.numpy()[:n]
    return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_float)), (n,))


def _axpb(a, b, out, n, SCALE):
    _view(out, n)[:] = _view(a, n) * SCALE + _view(b, n)


class _Compiled:
    packed_metadata, function = "meta", "fn"

    def __init__(self):
        self.launches = 0

    def run(self, g0, g1, g2, stream, function, meta, launch_metadata, enter, exit_, *args):
        assert (g0, g1, g2) == (1, 1, 1) and function == "fn" and meta == "meta" and enter is None
        self.launches += 1
        _axpb(*args)


class _Kernel:
    signature = inspect.signature(_axpb)

    def __init__(self):
        self.compiled = _Compiled()
        self.ordinary = 0

    def __getitem__(self, grid):
        def go(*args, num_warps=4, **kw):
            self.ordinary += 1
            _axpb(*args, **kw)
            return self.compiled
        return go


K = _Kernel()


def pipeline(x, y, *, compute=False, view_out=False, other_device=False):
    n = x.numel()
    if other_device:
        torch.empty(4, device="meta")  # one workspace cannot hold it
    tmp = torch.empty(n + 3)[3:]  # a view at an offset: replay must keep it
    zero = torch.zeros(n)
    launch(K, (1,), x, y, tmp, n, SCALE=2.0, num_warps=4)  # tmp = 2x + y
    out = torch.zeros(n + 1)  # zeroed after a launch, before any launch uses it: hoisted to the replay's start
    if compute:
        tmp.add_(1.0)  # a torch compute op: not replayable
    launch(K, (1,), tmp[0:], zero, out[1:], n, SCALE=3.0)  # out[1:] = 3 tmp: written at an offset
    return out[1:] if view_out else out


def _run(cache, x, y, **kw):
    return run_planned(cache, ("k", x.shape, tuple(kw.items())), [x, y], lambda: pipeline(x, y, **kw))


def test_replay_matches_the_ordinary_path_on_fresh_inputs():
    cache, K.ordinary, K.compiled.launches = PlanCache(), 0, 0
    x, y = torch.randn(37), torch.randn(37)
    first = _run(cache, x, y)
    assert K.ordinary == 2 and K.compiled.launches == 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x2, y2 = torch.randn(37, generator=g), torch.randn(37, generator=g)
        got = _run(cache, x2, y2)
        torch.testing.assert_close(got[1:], 3 * (2 * x2 + y2), rtol=0, atol=1e-5)
        assert got[0] == 0
        assert got.shape == first.shape and got.data_ptr() != first.data_ptr()
    assert K.ordinary == 2 and K.compiled.launches == 6  # replayed: no ordinary launch since the first call


def test_a_torch_compute_op_a_view_output_or_another_device_keeps_the_ordinary_path():
    for kw in ({"compute": True}, {"view_out": True}, {"other_device": True}):
        cache, K.ordinary, K.compiled.launches = PlanCache(), 0, 0
        x, y = torch.randn(8), torch.randn(8)
        for _ in range(3):
            _run(cache, x, y, **kw)
        assert list(cache.plans.values()) == [None] and K.ordinary == 6 and K.compiled.launches == 0


def test_recorder_sees_allocations_and_zero_fills():
    with Recorder() as rec:
        a = torch.empty(3)
        b = torch.zeros(5)
        c = torch.empty(4).zero_()
        a.view(3, 1)
    assert len(rec.allocs) == 3 and rec.zeroed == {1, 2} and rec.problem is None


def test_a_viewing_reshape_is_free_and_a_copying_one_is_not():
    with Recorder() as rec:
        a = torch.empty(4, 6)
        a.reshape(24)  # a view
    assert rec.problem is None
    with Recorder() as rec:
        a = torch.empty(4, 6)
        a.t().reshape(24)  # must copy
    assert rec.problem is not None


def test_cache_is_bounded():
    cache = PlanCache(size=2)
    for i in range(3):
        cache.put(i, None)
    assert list(cache.plans) == [1, 2]


class _Launcher36:
    """Triton 3.6's CudaLauncher surface: ``__call__`` allocates scratch, then calls the C ``launch``."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self):
        self.direct = self.via_call = 0

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.via_call += 1
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None,
                    *args)

    def launch(self, gx, gy, gz, stream, function, coop, pdl, scratch, profile, meta, launch_md, enter, exit_, *args):
        assert (coop, pdl, scratch, profile, meta, launch_md, enter, exit_) == (False, True, None, None, "meta", None,
                                                                                None, None)
        self.direct += 1
        _axpb(*args)


def test_triton_36_launchers_are_called_directly(monkeypatch):
    """A replay skips ``CudaLauncher.__call__`` when it only forwards (no scratch): same arguments to
    ``launch``. TORCH_MOE_OPS_DIRECT_LAUNCH=0: the full launcher."""
    run = _Launcher36()
    K.compiled.run = run
    try:
        monkeypatch.setenv(DIRECT_LAUNCH_ENV, "0")
        cache = PlanCache()
        x, y = torch.randn(9), torch.randn(9)
        _run(cache, x, y)
        _run(cache, x, y)
        assert run.direct == 2 and run.via_call == 2  # switched off: through __call__
        run.direct = run.via_call = 0
        monkeypatch.delenv(DIRECT_LAUNCH_ENV)  # the default
        cache = PlanCache()
        x, y = torch.randn(9), torch.randn(9)
        _run(cache, x, y)
        got = _run(cache, x, y)
        torch.testing.assert_close(got[1:], 3 * (2 * x + y), rtol=0, atol=1e-5)
        assert run.direct == 2 and run.via_call == 0  # both launches of the replay, straight to ``launch``
        run.global_scratch_size = 64  # a kernel with scratch keeps the full launcher
        cache = PlanCache()
        _run(cache, x, y)
        _run(cache, x, y)
        assert run.direct == 4 and run.via_call == 2
    finally:
        del K.compiled.run
