"""The launch-plan surface that CPU can check (the replay itself: tests/_kernels/test_plan_cuda.py)."""
from __future__ import annotations

import torch

import torch_moe_ops as moe
from torch_moe_ops.ops.fused_moe import PLANS


def test_cpu_calls_record_no_plan():
    PLANS.clear()
    x, logits = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 8)
    w13, w2 = torch.randn(8, 64, 64, dtype=torch.bfloat16), torch.randn(8, 64, 32, dtype=torch.bfloat16)
    moe.fused_moe(x, logits, w13, w2, 2)
    assert not PLANS.plans


def test_clear_launch_plans_forgets_every_plan():
    PLANS.put(("a key",), None)
    moe.clear_launch_plans()
    assert not PLANS.plans
