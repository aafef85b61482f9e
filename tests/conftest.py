"""Test setup: Triton runs through the CPU interpreter when no GPU is present. This must happen before
any kernel module is imported (``@triton.jit`` picks the interpreter at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist, split the cores between workers: one intra-op thread per core in every worker
# oversubscribes a small CI machine (~2.5x slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

import torch_moe_ops  # noqa: E402,F401  (registers the ops)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # The kernel tests run their launchers on CUDA tensors when a GPU is present: part of `-m cuda`.
        for item in items:
            if "tests/_kernels/" in str(item.path).replace(os.sep, "/"):
                item.add_marker(pytest.mark.cuda)
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """A different but reproducible seed per test (fresh data in every test, stable across runs)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(autouse=True)
def _batch_invariant_off():
    """Every test starts and ends with torch_moe_ops' batch-invariant switch off (a failing test cannot leak it)."""
    torch_moe_ops.set_batch_invariant(False)
    yield
    torch_moe_ops.set_batch_invariant(False)


@pytest.fixture
def invariant_calls(monkeypatch) -> list:
    """The ``invariant`` argument of every call of the CPU experts implementation (``reference.fused_experts``)
    and of the CPU saving forward (``reference.backward.fused_experts_forward``), in call order."""
    from torch_moe_ops import reference
    from torch_moe_ops.reference import backward

    calls = []
    for module, name in ((reference, "fused_experts"), (backward, "fused_experts_forward")):
        real = getattr(module, name)

        def spy(*args, invariant=False, _real=real, **kw):
            calls.append(invariant)
            return _real(*args, invariant=invariant, **kw)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache and counters around a compile test (frame and graph counts are per test)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
