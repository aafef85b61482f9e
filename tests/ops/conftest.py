"""Op-test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad(request):
    """Forward-only op tests run without grad recording. The autograd tests (``test_autograd*.py``) and the GPU
    files (``*_cuda.py``, which also check training graphs) record gradients as everywhere else."""
    module = request.module.__name__.rpartition(".")[2]
    if module.startswith("test_autograd") or module.endswith("_cuda"):
        yield
        return
    with torch.no_grad():
        yield
