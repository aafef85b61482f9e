"""Op-test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    """Forward-only op tests run without grad recording (autograd lives in tests/autograd)."""
    with torch.no_grad():
        yield
