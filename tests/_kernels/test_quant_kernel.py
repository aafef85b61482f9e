"""Triton weight and activation quantization (``_kernels.quant``, ``_kernels.activation.quantize_activation``)
against the registry's reference quantizers (docs/design.md §3): q bit for bit, scales exactly. GPU, or CPU
through the interpreter (with small shapes)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops._kernels import activation, quant, quant_tensor  # noqa: E402
from torch_moe_ops.reference import quant as ref_quant  # noqa: E402
from torch_moe_ops.schemes import (  # noqa: E402
    FP8_MAX,
    INT8_MAX,
    SCALE_EPS,
    get_activation_quant,
    get_weight_format,
)

from ._jit import compiled_variants as _compiled_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QDTYPES = {"fp8": torch.float8_e4m3fn, "u8": torch.uint8, "i8": torch.int8}
INT4 = get_weight_format("int4_group")


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8) if q.dtype != torch.int8 else q.cpu()


def _weight(shape, dtype, pad: int = 0, zero_expert: bool = False) -> torch.Tensor:
    """Weights (a view with rows padded by ``pad`` columns); optionally expert 1 (or row block) all zero."""
    full = torch.randn(*shape[:-1], shape[-1] + pad) * 0.05
    full[..., 0] = 3.0  # a few large entries so scales differ between rows
    w = full.to(dtype).to(DEVICE)[..., : shape[-1]]
    if zero_expert:
        w[1 if w.dim() == 3 else slice(0, 40)] = 0
    return w


def _check_weight(w, scheme, qdtype, block_shape=None, shards=1, qpad=0):
    """The kernel (format object + canonical block, as the ops layer passes them) against the reference."""
    fmt = get_weight_format(scheme)
    block = fmt.block_shape(block_shape)
    want_q, want_s = ref_quant.quantize_weight(w.cpu(), fmt, block, shards)
    qshape = fmt.packed_shape(w.shape)
    q = torch.empty(*qshape[:-1], qshape[-1] + qpad, dtype=qdtype, device=DEVICE)[..., : qshape[-1]]
    nan = float("nan") if fmt.scale_dtype.is_floating_point else 255  # NaN, also as an E8M0 byte
    s = torch.full(want_s.shape, nan, dtype=fmt.scale_dtype, device=DEVICE)
    quant.quantize_weight_into(w, q, s, fmt, block, shards)
    assert torch.equal(s.cpu(), want_s), "scales differ"
    assert torch.equal(_bits(q), _bits(want_q)), "q differs"
    return q, s


# (shape, dtype, scheme, qdtype, block_shape, shards, pad, zero)
CASES = [
    pytest.param((3, 100, 70), "bf16", "fp8_channel", "fp8", None, 1, 0, False, id="E3-N100-K70-fp8_channel"),
    pytest.param((2, 33, 257), "fp16", "fp8_channel", "u8", None, 1, 128, True, id="fp8_channel-u8-strided-zero"),
    pytest.param((3, 100, 70), "fp32", "int8_channel", "i8", None, 1, 0, False, id="int8_channel-fp32"),
    pytest.param((2, 40, 130), "bf16", "int8_channel", "i8", None, 1, 128, True, id="int8_channel-strided-zero"),
    pytest.param((2, 300, 260), "bf16", "fp8_block", "fp8", None, 1, 0, False, id="fp8_block-128-partial-blocks"),
    pytest.param((3, 100, 70), "fp16", "fp8_block", "u8", (32, 64), 1, 128, True, id="fp8_block-32x64-strided-zero"),
    pytest.param((3, 100, 70), "bf16", "fp8_tensor", "fp8", None, 1, 0, False, id="fp8_tensor"),
    pytest.param((3, 96, 70), "bf16", "fp8_tensor", "u8", None, 2, 128, True, id="fp8_tensor-2shards-strided-zero"),
    pytest.param((100, 70), "bf16", "fp8_channel", "fp8", None, 1, 0, False, id="2d-fp8_channel"),
    pytest.param((100, 70), "fp32", "fp8_tensor", "fp8", None, 2, 0, False, id="2d-fp8_tensor-2shards"),
    pytest.param((130, 200), "bf16", "fp8_block", "fp8", None, 1, 64, True, id="2d-fp8_block-strided-zero"),
    pytest.param((64, 96), "bf16", "int8_channel", "i8", None, 1, 0, True, id="2d-int8_channel-zero"),
    # int4 groups: odd N, every G, padded rows, all dtypes, 2-D
    pytest.param((3, 7, 128), "bf16", "int4_group", "u8", (1, 32), 1, 0, False, id="int4-G32-N7"),
    pytest.param((2, 33, 192), "fp16", "int4_group", "u8", (1, 64), 1, 64, True, id="int4-G64-N33-strided-zero"),
    pytest.param((2, 5, 256), "fp32", "int4_group", "u8", (1, 128), 1, 32, False, id="int4-G128-N5-strided-fp32"),
    pytest.param((3, 9, 4096), "bf16", "int4_group", "u8", None, 1, 0, False, id="int4-default-G128-K4096"),
    pytest.param((45, 96), "bf16", "int4_group", "u8", (1, 32), 1, 0, True, id="2d-int4-G32-zero"),
    # mxfp4: E8M0 scale bytes, E2M1 ties to even (the 3.0 entries give amax 3: scale 2^-1, so 0.75·k values tie)
    pytest.param((3, 7, 128), "bf16", "mxfp4", "u8", None, 1, 0, False, id="mxfp4-N7"),
    pytest.param((2, 33, 192), "fp16", "mxfp4", "u8", (1, 32), 1, 64, True, id="mxfp4-N33-strided-zero"),
    pytest.param((2, 5, 2880), "fp32", "mxfp4", "u8", None, 1, 32, False, id="mxfp4-K2880-strided-fp32"),
    pytest.param((45, 96), "bf16", "mxfp4", "u8", None, 1, 0, True, id="2d-mxfp4-zero"),
]


@pytest.mark.parametrize("shape,dtype,scheme,qdtype,block_shape,shards,pad,zero", CASES)
def test_quantize_weight_matches_reference(shape, dtype, scheme, qdtype, block_shape, shards, pad, zero):
    w = _weight(shape, DTYPES[dtype], pad, zero)
    _check_weight(w, scheme, QDTYPES[qdtype], block_shape, shards, qpad=pad)


def test_quantize_weight_all_zero_gives_finite_scale():
    qmax = {"fp8_channel": FP8_MAX, "int8_channel": INT8_MAX, "fp8_block": FP8_MAX, "fp8_tensor": FP8_MAX}
    for scheme, q_dtype in (("fp8_channel", "fp8"), ("int8_channel", "i8"), ("fp8_block", "fp8"), ("fp8_tensor", "fp8")):
        w = torch.zeros(2, 16, 48, dtype=torch.bfloat16, device=DEVICE)
        q, s = _check_weight(w, scheme, QDTYPES[q_dtype])
        assert (q.cpu().float() == 0).all()
        assert torch.allclose(s.cpu(), torch.full_like(s.cpu(), SCALE_EPS / qmax[scheme]))


@pytest.mark.parametrize("G", [32, 64, 128])
def test_quantize_weight_int4_bit_exact_and_zero_groups(G):
    """Against ``get_weight_format("int4_group").quantize`` bit for bit; an all-zero group (also -0.0)
    gets scale 0 and q 0, never NaN, and leaves its neighbours alone."""
    E, N, K = 2, 7, 4 * G
    w = (torch.randn(E, N, K) * torch.rand(E, N, 1) * 4).to(torch.bfloat16).to(DEVICE)
    w[0, 3, G:2 * G] = 0
    w[1, 6, :G] = -0.0
    block = INT4.block_shape([1, G])
    want_q, want_s = INT4.quantize(w.cpu(), block)
    q = torch.full((E, N, K // 2), 0xAB, dtype=torch.uint8, device=DEVICE)
    s = torch.full((E, N, K // G), float("nan"), device=DEVICE)
    quant.quantize_weight_into(w, q, s, INT4, block, 1)
    assert torch.equal(s.cpu(), want_s) and torch.equal(q.cpu(), want_q)
    assert torch.isfinite(s).all() and s[0, 3, 1] == 0 and s[1, 6, 0] == 0
    assert (q[0, 3, G // 2:G].cpu() == 0).all() and (q[1, 6, : G // 2].cpu() == 0).all()
    assert (s[0, 3, [0, 2, 3]] > 0).all() and (s[1, 6, 1:] > 0).all()


def test_quantize_weight_int4_rounds_half_even_and_packs_low_nibble_first():
    # groups with amax 7 -> scale 1: q = round(x), x.5 to the even neighbour; element 2j is byte j's low nibble
    row = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -7.0, 6.5, -6.5, 3.49, -3.51, 0.0, -0.0, 1.0, -1.0])
    w = row.repeat(3, 2).to(DEVICE)  # [3, 32]: one G = 32 group per row
    q, s = _check_weight(w, "int4_group", torch.uint8, (1, 32))
    assert s.cpu().tolist() == [[1.0]] * 3
    want = [7, 0, 2, 2, 0, -2, -2, -7, 6, -6, 3, -4, 0, 0, 1, -1] * 2
    nib = [v & 0xF for v in want]
    assert q[0].cpu().tolist() == [nib[2 * j] | (nib[2 * j + 1] << 4) for j in range(16)]
    values = INT4.dequantize(q.cpu()[None], s.cpu()[None], (1, 32))[0, 0]
    assert torch.equal(values, torch.tensor(want, dtype=torch.float32))


def test_quantize_weight_mxfp4_ties_subnormal_and_huge_groups():
    """Every E2M1 midpoint (ties to the even code), a group whose amax is subnormal (byte 0), an all-zero group,
    a huge value (byte 254 region) against the registry's quantizer bit for bit."""
    w = torch.zeros(4, 64)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w[0, :32] = torch.cat([mids, -mids, mids * 0.5, -mids * 0.25])  # amax 6: scale 2^0
    w[1, 0] = 1e-41
    w[2, 32:] = torch.randn(32) * 1e30
    _check_weight(w.to(DEVICE), "mxfp4", torch.uint8)


def test_quantize_weight_int4_refuses_k_not_divisible_by_group():
    w = torch.randn(2, 4, 96, device=DEVICE)
    q = torch.empty(2, 4, 48, dtype=torch.uint8, device=DEVICE)
    s = torch.empty(2, 4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="not divisible by the group size 64"):
        quant.quantize_weight_into(w, q, s, INT4, (1, 64), 1)


@pytest.mark.parametrize("scheme,qdtype", [("fp8_channel", "fp8"), ("int8_channel", "i8")])
def test_quantize_weight_long_rows_two_loops(monkeypatch, scheme, qdtype):
    monkeypatch.setattr(quant, "_MAX_ROW", 64)  # rows longer than a register tile: amax loop + quant loop
    _check_weight(_weight((2, 5, 300), torch.bfloat16, pad=16), scheme, QDTYPES[qdtype])


def test_quantize_weight_int4_many_group_blocks(monkeypatch):
    monkeypatch.setattr(quant, "_GROUP_TILE", 128)  # 2 groups of 32 per program: a grid of group blocks
    _check_weight(_weight((2, 3, 320), torch.bfloat16, pad=8), "int4_group", torch.uint8, (1, 32))


class _Spy:
    """Wraps a JIT kernel: records the launch arguments by name, then launches it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(dict(zip(self.kernel.arg_names, args)))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("slack,reverse", [(0, True), (1, False), (7, True), (100, True)])
def test_quantize_weight_fp8_tensor_many_chunks(monkeypatch, slack, reverse):
    monkeypatch.setattr(quant_tensor, "_TENSOR_TILE", 512)  # 4-row tiles of the 64-row shards below
    monkeypatch.setattr(quant_tensor, "_CHUNK", 512)  # one tile per work item: 16 amax + 16 quantize items per shard
    monkeypatch.setattr(quant_tensor, "_LAG_SLACK", slack)  # quantize items one shard + slack chunks behind (capped)
    monkeypatch.setattr(quant_tensor, "_REVERSE_QUANT", reverse)
    calls = []
    real = quant_tensor._quant_weight_tensor_kernel
    monkeypatch.setattr(quant_tensor, "_quant_weight_tensor_kernel", _Spy(real, calls))
    _check_weight(_weight((3, 128, 80), torch.bfloat16, pad=32, zero_expert=True), "fp8_tensor", torch.float8_e4m3fn,
                  shards=2)
    assert [c["chunks"] for c in calls] == [16]  # the case really has several chunks per shard


def test_int8_rounds_half_to_even():
    # rows with amax 127 -> scale 1: q = round(x) exactly, x.5 goes to the even neighbour
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 3.49, -3.51, 0.0])
    w = row.repeat(4, 1).to(DEVICE)
    q, _ = _check_weight(w, "int8_channel", torch.int8)
    assert q[0].cpu().tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -127, 3, -4, 0]


# (T, K, dtype, scheme, group, row_pad)
ACT_CASES = [
    pytest.param(1, 64, "bf16", "fp8_token", 128, 0, id="T1-K64-token"),
    pytest.param(7, 300, "fp16", "fp8_token", 128, 20, id="T7-K300-token-strided"),
    pytest.param(33, 256, "fp32", "fp8_group", 128, 0, id="T33-K256-group128"),
    pytest.param(9, 300, "bf16", "fp8_group", 128, 64, id="T9-K300-group128-partial-strided"),
    pytest.param(5, 100, "bf16", "fp8_group", 32, 0, id="T5-K100-group32"),
]


@pytest.mark.parametrize("T,K,dtype,scheme,group,row_pad", ACT_CASES)
def test_quantize_activation_matches_reference(T, K, dtype, scheme, group, row_pad):
    x = (torch.randn(T, K + row_pad) * 3).to(DTYPES[dtype]).to(DEVICE)[:, :K]
    x[T // 2] = 0  # all-zero token: finite scale, q = 0
    aq = get_activation_quant(scheme)
    q, s = activation.quantize_activation(x, aq, group)
    want_q, want_s = aq.quantize(x.cpu(), group)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == want_s.shape
    assert s.shape == (T, aq.scale_cols(K, group))
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(_bits(q), _bits(want_q))
    assert (q[T // 2].cpu().float() == 0).all() and torch.isfinite(s).all()


def test_quantize_activation_token_sweep_adds_no_compilations():
    token, group = get_activation_quant("fp8_token"), get_activation_quant("fp8_group")
    activation.quantize_activation(torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16), token)
    activation.quantize_activation(torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16), group, 128)
    before = _compiled_variants(activation._act_quant_kernel)
    for T in (1, 2, 3, 17, 64):
        x = torch.randn(T, 256, device=DEVICE, dtype=torch.bfloat16)
        activation.quantize_activation(x, token)
        activation.quantize_activation(x, group, 128)
    assert _compiled_variants(activation._act_quant_kernel) == before
