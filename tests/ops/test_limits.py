"""Bad values and size limits at the op boundary (docs/design.md §7, §8): T·k >= 2^31 pairs is refused by the
checks and the fakes before any allocation; non-finite weights and correction biases are refused on CPU."""
import pytest
import torch

import torch_moe_ops

T_BIG, K_BIG, H = 2**30, 2, 64  # 2^31 pairs: one past the int32 sentinel


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_fused_experts_refuses_2_31_pairs_on_fake_tensors():
    x, w13, w2 = _meta(T_BIG, H), _meta(4, 64, H), _meta(4, H, 32)
    w, ids = _meta(T_BIG, K_BIG, dtype=torch.float32), _meta(T_BIG, K_BIG, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"T \* top_k = 1073741824 \* 2 \(token, expert\) pairs exceed the int32"):
        torch_moe_ops.fused_experts(x, w13, w2, w, ids)
    with pytest.raises(ValueError, match="pairs exceed the int32"):
        torch_moe_ops.fused_moe(x, _meta(T_BIG, 4, dtype=torch.float32), w13, w2, K_BIG)
    with pytest.raises(ValueError, match="topk_ids: T \\* top_k"):
        torch_moe_ops.align_block_size(ids, 4, 16)


def test_one_pair_below_the_limit_is_accepted_by_the_fake():
    x, w13, w2 = _meta(2**31 - 1, H), _meta(4, 64, H), _meta(4, H, 32)
    out = torch_moe_ops.fused_experts(x, w13, w2, _meta(2**31 - 1, 1, dtype=torch.float32),
                                      _meta(2**31 - 1, 1, dtype=torch.int32))
    assert out.shape == (2**31 - 1, H) and out.device.type == "meta"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_channel", "fp8_block", "int8_channel", "int4_group"])
def test_non_finite_weight_is_refused(scheme, bad):
    w = torch.randn(2, 16, 128) / 10
    w[1, 5, 7] = bad
    with pytest.raises(ValueError, match=r"w has non-finite values \(first at index \[1, 5, 7\]"):
        torch_moe_ops.quantize_weight(w, scheme)
    q, s = torch_moe_ops.quantize_weight(torch.zeros(2, 16, 128), scheme)
    q0, s0 = q.clone(), s.clone()
    with pytest.raises(ValueError, match="non-finite"):
        torch_moe_ops.quantize_weight_into(w, q, s, scheme)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0), "storage was touched"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_correction_bias_is_refused(bad):
    logits, bias = torch.randn(5, 16), torch.randn(16)
    bias[3] = bad
    with pytest.raises(ValueError, match=r"e_score_correction_bias has non-finite values \(first at index \[3\]"):
        torch_moe_ops.topk_route(logits, 2, scoring_func="sigmoid", e_score_correction_bias=bias)


def test_nan_token_poisons_only_its_row():
    """A NaN in one token's hidden state gives NaN in that row only, in every scheme (reference backend)."""
    from torch_moe_ops.testing import random_moe_weights

    E, Hh, I, T, k = 4, 64, 32, 6, 2
    w13, w2, _, _ = random_moe_weights(E, Hh, I, dtype=torch.float32)
    x = torch.randn(T, Hh).bfloat16() / 10
    x[2, 5] = float("nan")
    ids = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3], [0, 2], [1, 3]], dtype=torch.int32)
    w = torch.rand(T, k)
    for scheme, fmt, bs in [("none", None, None), ("fp8_tensor", "fp8_tensor", None),
                            ("fp8_channel", "fp8_channel", None), ("fp8_block", "fp8_block", [32, 32]),
                            ("int8_w8a16", "int8_channel", None), ("int4_w4a16", "int4_group", [1, 32])]:
        if fmt is None:
            args = dict(w13=w13.bfloat16(), w2=w2.bfloat16())
        else:
            (q13, s13), (q2, s2) = (torch_moe_ops.quantize_weight(t, fmt, block_shape=bs) for t in (w13, w2))
            args = dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, quant_scheme=scheme, block_shape=bs)
        out = torch_moe_ops.fused_experts(x, args.pop("w13"), args.pop("w2"), w, ids, **args)
        assert torch.isnan(out[2]).all(), scheme
        others = torch.cat([out[:2], out[3:]])
        assert torch.isfinite(others).all(), f"{scheme}: the NaN leaked into other tokens' rows"
