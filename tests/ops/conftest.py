"""Op-test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    """The ops are inference-only (no autograd formula): run every op test without grad recording."""
    with torch.no_grad():
        yield
