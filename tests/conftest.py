"""Test setup: Triton runs through the CPU interpreter when no GPU is present. This must happen before
any kernel module is imported (``@triton.jit`` picks the interpreter at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import torch_moe_ops  # noqa: E402,F401  (registers the ops)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item() if os.environ.get("TORCH_MOE_OPS_RANDOM_SEED") else 0)
    yield
