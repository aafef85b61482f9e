"""``torch_moe_ops.testing``: its ``opcheck`` runs every check but the schema test for fp8 arguments, where the
plain ``torch.library.opcheck`` trips on Float8 ``allclose``."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops import testing


def test_testing_opcheck_skips_schema_only_for_fp8():
    q, s = torch_moe_ops.quantize_weight(torch.randn(2, 16, 32), "fp8_channel")
    x = torch.randn(3, 32)
    w, ids = torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    q2, s2 = torch_moe_ops.quantize_weight(torch.randn(2, 32, 16), "fp8_channel")
    with pytest.raises(Exception):  # the plain opcheck trips on Float8 allclose: the reason for the helper
        torch.library.opcheck(torch.ops.moe.fused_experts.default, (x, q, q2, w, ids, "silu_no_mul", "fp8_channel",
                                                                     s, s2))
    testing.opcheck(torch.ops.moe.fused_experts.default, (x, q, q2, w, ids, "silu_no_mul", "fp8_channel", s, s2))
