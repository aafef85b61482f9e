"""Triton activations and the fused activation + fp8 quantization (``_kernels.activation``) against
``reference.activation`` / ``reference.quant`` (docs/design.md §3, §6). The kernels take the ``Activation``
and ``ActivationQuant`` objects, as the ops layer passes them. GPU, or CPU through the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import activation  # noqa: E402
from torch_moe_ops.schemes import (  # noqa: E402
    ACTIVATIONS,
    FP8_MAX,
    SCALE_EPS,
    SWIGLU_ALPHA,
    get_activation,
    get_activation_quant,
)
from torch_moe_ops.reference import activation as ref_act  # noqa: E402
from torch_moe_ops.reference.quant import quantize_activation as ref_quantize_activation  # noqa: E402

#: The interpreter evaluates exp() in numpy, which warns when exp(-x) overflows to inf (the math stays exact).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
from ._jit import compiled_variants as _compiled_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-5)}


def _input(M: int, N: int, dtype: torch.dtype, row_pad: int = 0, scale: float = 4.0) -> torch.Tensor:
    """[M, N] with rows strided by N + row_pad (a view), values ~ N(0, scale) so clamps at 7 bite."""
    full = torch.randn(M, N + row_pad) * scale
    return full.to(dtype).to(DEVICE)[:, :N]


def _activation_cases():
    for name, act in ACTIVATIONS.items():
        limits = (0.0, 7.0) if act.gated else (0.0,)
        for limit in limits:
            yield pytest.param(name, limit, id=f"{name}-limit{limit:g}")


@pytest.mark.parametrize("act,limit", list(_activation_cases()))
@pytest.mark.parametrize(
    "M,N,dtype,row_pad",
    [pytest.param(1, 64, "bf16", 0, id="M1-N64-bf16"), pytest.param(7, 400, "fp32", 0, id="M7-N400-fp32"),
     pytest.param(33, 258, "fp16", 40, id="M33-N258-fp16-strided")],
)
def test_act_and_mul_matches_reference(act, limit, M, N, dtype, row_pad):
    x = _input(M, N, DTYPES[dtype], row_pad)
    y = activation.act_and_mul(x, get_activation(act), SWIGLU_ALPHA, limit)
    want = ref_act.act_and_mul(x.cpu(), act, SWIGLU_ALPHA, limit)
    assert y.dtype == x.dtype and y.shape == want.shape
    torch.testing.assert_close(y.cpu().float(), want.float(), **TOL[x.dtype])


def test_act_and_mul_out_and_alias():
    x = _input(5, 96, torch.bfloat16)
    out = torch.empty(5, 48 + 16, dtype=torch.bfloat16, device=DEVICE)[:, :48]
    y = activation.act_and_mul(x, get_activation("gelu_pytorch_tanh"), SWIGLU_ALPHA, 0.0, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu().float(), ref_act.act_and_mul(x.cpu(), "gelu_tanh").float(), **TOL[x.dtype])
    with pytest.raises(ValueError, match="relu2_no_mul"):  # names resolve before any kernel sees them
        get_activation("relu2")


def test_identity_kernel_passes_values_through():
    """``IDENTITY`` (quantize_activation's activation) is a plain copy through the activation kernel."""
    from torch_moe_ops.schemes import IDENTITY

    x = _input(7, 200, torch.float32, row_pad=8)
    assert torch.equal(activation.act_and_mul(x, IDENTITY, SWIGLU_ALPHA, 0.0).cpu(), x.cpu())


def _check_quant(q, s, y_fp32, scheme, group):
    """q/s against quantize_activation(y_fp32): scales to 1e-6 relative, q within one e4m3 step."""
    rq, rs = ref_quantize_activation(y_fp32, scheme, group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == rq.shape and s.shape == rs.shape
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-6, atol=0)
    qf, rqf = q.cpu().float(), rq.float()
    assert ((qf - rqf).abs() <= rqf.abs() / 8 + 2.0**-9).all()  # kernel vs torch fp32 math: one step at most
    assert (qf != rqf).float().mean() < 0.01


@pytest.mark.parametrize("act,limit", list(_activation_cases()))
@pytest.mark.parametrize("scheme,group", [pytest.param("fp8_token", 128, id="token"),
                                          pytest.param("fp8_group", 64, id="group64")])
def test_act_and_quant_matches_reference(act, limit, scheme, group):
    x = _input(6, 2 * 160, torch.bfloat16, row_pad=32)
    x[2] = 0  # all-zero row: finite scale, q = 0
    q, s = activation.act_and_quant(x, get_activation(act), SWIGLU_ALPHA, limit, get_activation_quant(scheme), group)
    y = ref_act.act_and_mul_fp32(x.cpu(), act, SWIGLU_ALPHA, limit)
    _check_quant(q, s, y, scheme, group)
    assert torch.isfinite(s).all() and (q[2].cpu().float() == 0).all()
    assert torch.allclose(s[2].cpu(), torch.tensor(SCALE_EPS / FP8_MAX))


@pytest.mark.parametrize("act", ["silu", "swigluoai", "relu2_no_mul"])
def test_act_and_quant_two_pass_rows(monkeypatch, act):
    monkeypatch.setattr(activation, "_ONE_PASS_MAX", 64)  # rows longer than a tile: amax pass + quant pass
    x = _input(3, 2 * 150, torch.float32)
    q, s = activation.act_and_quant(x, get_activation(act), SWIGLU_ALPHA, 7.0, get_activation_quant("fp8_token"))
    _check_quant(q, s, ref_act.act_and_mul_fp32(x.cpu(), act, SWIGLU_ALPHA, 7.0), "fp8_token", 128)


def test_act_and_quant_group128_odd_width():
    x = _input(17, 2 * 300, torch.bfloat16)  # 300 outputs: groups of 128, 128, 44
    group = get_activation_quant("fp8_group")
    q, s = activation.act_and_quant(x, get_activation("silu"), SWIGLU_ALPHA, 0.0, group, 128)
    assert s.shape == (17, 3)
    _check_quant(q, s, ref_act.act_and_mul_fp32(x.cpu(), "silu"), "fp8_group", 128)


@pytest.mark.parametrize("group", [96, 48])
def test_act_and_quant_groups_of_any_size(group):
    """A scale tile whose K is not a power of two (fp8_block with block_shape [128, 96]) gives groups of that
    size: the kernel masks a power-of-two tile (300 outputs: groups of 96, 96, 96, 12)."""
    x = _input(5, 2 * 300, torch.bfloat16)
    aq = get_activation_quant("fp8_group")
    q, s = activation.act_and_quant(x, get_activation("silu"), SWIGLU_ALPHA, 0.0, aq, group)
    assert s.shape == (5, -(-300 // group))
    _check_quant(q, s, ref_act.act_and_mul_fp32(x.cpu(), "silu"), "fp8_group", group)


def test_activation_token_sweep_adds_no_compilations():
    from torch_moe_ops._kernels import moe_sum

    kernels = (activation._act_and_mul_kernel, activation._act_quant_kernel, moe_sum._moe_sum_kernel)
    silu, group = get_activation("silu"), get_activation_quant("fp8_group")

    def run(T):
        x = _input(T, 128, torch.bfloat16)
        activation.act_and_mul(x, silu, SWIGLU_ALPHA, 0.0)
        activation.act_and_quant(x, silu, SWIGLU_ALPHA, 0.0, group, 64)
        moe_sum.moe_sum(torch.randn(T, 4, 64, device=DEVICE, dtype=torch.bfloat16))

    run(5)
    before = [_compiled_variants(k) for k in kernels]
    for T in (1, 2, 3, 17, 64):
        run(T)
    assert [_compiled_variants(k) for k in kernels] == before
