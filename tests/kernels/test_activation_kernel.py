"""Triton activations, fused activation + fp8 quantization and moe_sum (``_kernels.activation``) against
``reference.activation`` / ``reference.quant`` (spec §3, §6, §8.2). GPU, or CPU through the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import activation  # noqa: E402
from torch_moe_ops._spec import ACTIVATIONS, GATED_ACTIVATIONS, SCALE_EPS, FP8_MAX  # noqa: E402
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
    for act in ACTIVATIONS:
        limits = (0.0, 7.0) if act in GATED_ACTIVATIONS else (0.0,)
        for limit in limits:
            yield pytest.param(act, limit, id=f"{act}-limit{limit:g}")


@pytest.mark.parametrize("act,limit", list(_activation_cases()))
@pytest.mark.parametrize(
    "M,N,dtype,row_pad",
    [pytest.param(1, 64, "bf16", 0, id="M1-N64-bf16"), pytest.param(7, 400, "fp32", 0, id="M7-N400-fp32"),
     pytest.param(33, 258, "fp16", 40, id="M33-N258-fp16-strided")],
)
def test_act_and_mul_matches_reference(act, limit, M, N, dtype, row_pad):
    x = _input(M, N, DTYPES[dtype], row_pad)
    y = activation.act_and_mul(x, act, 1.702, limit)
    want = ref_act.act_and_mul(x.cpu(), act, 1.702, limit)
    assert y.dtype == x.dtype and y.shape == want.shape
    torch.testing.assert_close(y.cpu().float(), want.float(), **TOL[x.dtype])


def test_act_and_mul_out_and_alias():
    x = _input(5, 96, torch.bfloat16)
    out = torch.empty(5, 48 + 16, dtype=torch.bfloat16, device=DEVICE)[:, :48]
    y = activation.act_and_mul(x, "gelu_pytorch_tanh", out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu().float(), ref_act.act_and_mul(x.cpu(), "gelu_tanh").float(), **TOL[x.dtype])
    with pytest.raises(ValueError, match="relu2_no_mul"):
        activation.act_and_mul(x, "relu2")


@pytest.mark.parametrize(
    "T,k,H,dtype",
    [pytest.param(1, 1, 64, "bf16", id="T1-k1-H64-bf16"), pytest.param(5, 3, 100, "fp16", id="T5-k3-H100-fp16"),
     pytest.param(9, 8, 257, "fp32", id="T9-k8-H257-fp32"), pytest.param(4, 32, 40, "bf16", id="T4-k32-H40-bf16")],
)
def test_moe_sum_matches_reference(T, k, H, dtype):
    x = torch.randn(T, k, H).to(DTYPES[dtype]).to(DEVICE)
    y = activation.moe_sum(x)
    want = ref_act.moe_sum(x.cpu())
    assert y.dtype == x.dtype and y.shape == (T, H)
    torch.testing.assert_close(y.cpu().float(), want.float(), **TOL[x.dtype])


@pytest.mark.parametrize("with_map,ids_dtype", [(False, torch.int32), (True, torch.int32), (True, torch.int64)])
def test_moe_sum_skips_dropped_slots(with_map, ids_dtype):
    """Slots with ids outside [0, E) or mapped to -1 are never read (NaN there must not leak)."""
    T, k, H, E = 6, 3, 70, 5
    x = torch.randn(T, k, H)
    ids = torch.randint(0, E, (T, k), dtype=ids_dtype)
    ids[0, 1], ids[2, 0], ids[4, 2], ids[5, 1] = -1, E, E + 7, -9
    emap = torch.tensor([0, -1, 1, 2, -1], dtype=torch.int32)
    keep = (ids >= 0) & (ids < E)
    if with_map:
        keep &= emap[ids.clamp(0, E - 1).long()] >= 0
    x[~keep] = float("nan")
    y = activation.moe_sum(x.to(DEVICE), topk_ids=ids.to(DEVICE), expert_map=emap.to(DEVICE) if with_map else None,
                           num_experts=E)
    want = torch.where(keep[:, :, None], x, 0.0).sum(1)
    assert keep.sum() < T * k and torch.isfinite(y.cpu()).all()
    torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)


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
    q, s = activation.act_and_quant(x, act, 1.702, limit, scheme, group)
    y = ref_act.act_and_mul_fp32(x.cpu(), act, 1.702, limit)
    _check_quant(q, s, y, scheme, group)
    assert torch.isfinite(s).all() and (q[2].cpu().float() == 0).all()
    assert torch.allclose(s[2].cpu(), torch.tensor(SCALE_EPS / FP8_MAX))


@pytest.mark.parametrize("act", ["silu", "swigluoai", "relu2_no_mul"])
def test_act_and_quant_two_pass_rows(monkeypatch, act):
    monkeypatch.setattr(activation, "_ONE_PASS_MAX", 64)  # rows longer than a tile: amax pass + quant pass
    x = _input(3, 2 * 150, torch.float32)
    q, s = activation.act_and_quant(x, act, 1.702, 7.0, "fp8_token")
    _check_quant(q, s, ref_act.act_and_mul_fp32(x.cpu(), act, 1.702, 7.0), "fp8_token", 128)


def test_act_and_quant_group128_odd_width():
    x = _input(17, 2 * 300, torch.bfloat16)  # 300 outputs: groups of 128, 128, 44
    q, s = activation.act_and_quant(x, "silu", scheme="fp8_group", group_size=128)
    assert s.shape == (17, 3)
    _check_quant(q, s, ref_act.act_and_mul_fp32(x.cpu(), "silu"), "fp8_group", 128)


def test_activation_token_sweep_adds_no_compilations():
    kernels = (activation._act_and_mul_kernel, activation._act_quant_kernel, activation._moe_sum_kernel)

    def run(T):
        x = _input(T, 128, torch.bfloat16)
        activation.act_and_mul(x, "silu")
        activation.act_and_quant(x, "silu", scheme="fp8_group", group_size=64)
        activation.moe_sum(torch.randn(T, 4, 64, device=DEVICE, dtype=torch.bfloat16))

    run(5)
    before = [_compiled_variants(k) for k in kernels]
    for T in (1, 2, 3, 17, 64):
        run(T)
    assert [_compiled_variants(k) for k in kernels] == before
