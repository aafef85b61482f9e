"""Autograd-test setup: register the autograd formulas (until ``torch_moe_ops.ops`` imports them itself)."""
import torch_moe_ops.ops.autograd  # noqa: F401
