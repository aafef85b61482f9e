"""The Triton backward (``_kernels/backward.py``) through the CPU interpreter (TORCH_MOE_OPS_BACKEND=triton),
on tiny shapes, against the reference backward (the default CPU backend) on the same inputs.

Tolerances (``assert_grad_close``): fp32 1e-5 (both compute in fp32; the order of the sums differs). bf16 /
fp16 2e-2: the Triton path keeps c1, GEMM2's input and dc1 in the compute dtype (the reference keeps fp32),
~2^-8 relative per rounding; fp8 schemes re-quantize those rounded values, so a few fp8 codes differ."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops._kernels import backward as KB

from tests.grad_cases import DIFF, expert_case, requires_grad
from tests.grad_oracle import assert_grad_close

CASES = {
    "none-fp32-silu-bias": dict(),
    "none-bf16-swigluoai-on_input-expert_map-empty": dict(dtype=torch.bfloat16, activation="swigluoai",
                                                          on_input=True, expert_map=True, empty_expert=True),
    "none-fp32-gelu_tanh_no_mul-k1-T1": dict(activation="gelu_tanh_no_mul", k=1, T=1),
    "none-fp16-gelu-clamp": dict(dtype=torch.float16, activation="gelu", limit=0.5),
    "none-fp32-T33-E4-multiblock-strided": dict(T=33, E=4, bias=False, strided=True),
    "fp8_tensor-silu": dict(scheme="fp8_tensor"),
    "fp8_channel-on_input": dict(scheme="fp8_channel", on_input=True),
    "fp8_block-bf16-32": dict(scheme="fp8_block", dtype=torch.bfloat16, H=64, I=32, block_shape=[32, 32]),
    "int8-relu2_no_mul": dict(scheme="int8_w8a16", activation="relu2_no_mul"),
    "int4-G32-strided": dict(scheme="int4_w4a16", H=64, I=32, block_shape=[1, 32], strided=True),
    "mxfp4-bf16-swigluoai": dict(scheme="mxfp4", dtype=torch.bfloat16, activation="swigluoai", H=64, I=32),
    # BLOCK_N 64 over C = 96 packed columns: the last column tile wraps (offs_wj % C_STORED); fp16 dots
    "int4-fp16-G32-wrap": dict(scheme="int4_w4a16", dtype=torch.float16, H=96, I=64, block_shape=[1, 32],
                               dgrad_bn=64),
    "mxfp4-fp16-wrap": dict(scheme="mxfp4", dtype=torch.float16, H=96, I=32, dgrad_bn=64),
    "T0": dict(T=0),
}
FROZEN = ("hidden_states", "topk_weights", "w13_bias", "w2_bias")
if torch.cuda.is_available():  # CPU tensors need the interpreter; on a GPU, test_backward_cuda.py covers this
    pytest.skip("the interpreter's test of the Triton backward (CPU only)", allow_module_level=True)
# The activation runs on every row of the recomputed c1, including the never-written rows of dropped pairs
# (as in the forward, docs/design.md §8: no zero-fill); their garbage may overflow in the interpreter's exp.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _grads(case, names):
    op = case["op"]
    names = [n for n in names if op.get(n) is not None]
    out = torch_moe_ops.fused_experts(**op)
    return out, dict(zip(names, torch.autograd.grad(out, [op[n] for n in names], case["grad"])))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_backward_matches_reference(name, monkeypatch):
    kw = dict(CASES[name])
    bn = kw.pop("dgrad_bn", None)
    if bn is not None:  # wider dgrad column tiles than the interpreter's 32
        tiles = KB._dgrad_tiles
        monkeypatch.setattr(KB, "_dgrad_tiles", lambda *a: dict(tiles(*a), BLOCK_N=bn))
    case = expert_case(**kw)
    names = FROZEN if case["scheme"].quantized else DIFF
    requires_grad(case, names)
    _, want = _grads(case, names)
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    calls = []
    triton_backward = KB.fused_experts_backward
    monkeypatch.setattr(KB, "fused_experts_backward", lambda *a: calls.append(1) or triton_backward(*a))
    _, got = _grads(case, names)
    assert calls, "the Triton backward did not run"
    tol = 1e-5 if case["op"]["hidden_states"].dtype == torch.float32 else 2e-2
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape
        assert torch.isfinite(got[n]).all(), n
        assert_grad_close(want[n], got[n], tol, n)


def test_fused_moe_router_gradient_on_triton(monkeypatch):
    case = expert_case(T=9, E=4, activation="gelu")
    op = case["op"]
    x = op["hidden_states"].requires_grad_()
    logits = torch.randn(9, 4, requires_grad=True)
    w13, w2 = op["w13"].requires_grad_(), op["w2"].requires_grad_()

    def grads():
        out = torch_moe_ops.fused_moe(x, logits, w13, w2, 2, activation="gelu", scoring_func="sigmoid")
        return torch.autograd.grad(out, (x, logits, w13, w2), case["grad"])

    want = grads()
    monkeypatch.setenv("TORCH_MOE_OPS_BACKEND", "triton")
    for g, w in zip(grads(), want):
        assert_grad_close(w, g, 1e-5)


def test_expert_block_bounds():
    """Block ranges per expert from expert_ids: -1 blocks and blocks past num_post_pad belong to nobody."""
    expert_ids = torch.tensor([0, 0, 2, 3, 3, 3, -1, -1], dtype=torch.int32)
    bounds = KB.expert_block_bounds(expert_ids, torch.tensor([96], dtype=torch.int32), 16, 5)
    assert bounds.tolist() == [0, 2, 2, 3, 6, 6]
    bounds = KB.expert_block_bounds(expert_ids, torch.tensor([48], dtype=torch.int32), 16, 5)  # 3 live blocks
    assert bounds.tolist() == [0, 2, 2, 3, 3, 3]
