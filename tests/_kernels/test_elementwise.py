"""The one-place Triton code of activations and weight codecs (``_kernels/activation.py``'s ``_elementwise``,
``_kernels/formats.py``) against the registry's torch side, and the compile-time refusal of unknown names
(docs/architecture.md: no branch falls through). GPU, or CPU through the interpreter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from torch_moe_ops._kernels.activation import _elementwise  # noqa: E402
from torch_moe_ops._kernels.formats import decode_pairs, decode_scale, stored_value_scales  # noqa: E402
from torch_moe_ops.schemes import ACTIVATIONS, IDENTITY, WEIGHT_FORMATS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _fn_grad_kernel(x_ptr, f_ptr, d_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    f, d = _elementwise(x, ACT)
    tl.store(f_ptr + offs, f, mask=offs < n)
    tl.store(d_ptr + offs, d, mask=offs < n)


@triton.jit
def _decode_kernel(q_ptr, pairs_ptr, n, W_CODEC: tl.constexpr, BLOCK: tl.constexpr):
    """q: [n] bytes -> pairs [n, 2] (decode_pairs, in the dtype of ``pairs``)."""
    j = tl.arange(0, BLOCK)
    q = tl.load(q_ptr + j, mask=j < n, other=0)
    lo, hi = decode_pairs(q, W_CODEC, pairs_ptr.dtype.element_ty)
    tl.store(pairs_ptr + 2 * j, lo, mask=j < n)
    tl.store(pairs_ptr + 2 * j + 1, hi, mask=j < n)


@triton.jit
def _scale_kernel(s_ptr, out_ptr, n, W_CODEC: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK)
    tl.store(out_ptr + j, decode_scale(tl.load(s_ptr + j, mask=j < n), W_CODEC).to(tl.float32), mask=j < n)


_KERNEL_NAMES = sorted({a.kernel for a in ACTIVATIONS.values() if not a.swiglu_oai} | {IDENTITY.kernel})


@pytest.mark.parametrize("kernel", _KERNEL_NAMES)
def test_elementwise_matches_the_registry_fn_and_grad(kernel):
    """Each elementwise function's f and f' in Triton against its torch ``fn`` / ``grad`` (one activation, two
    implementations that must agree), including large |x| (exp overflow) and 0."""
    act = IDENTITY if kernel == IDENTITY.kernel else next(a for a in ACTIVATIONS.values() if a.kernel == kernel)
    x = torch.cat([torch.randn(200) * 3, torch.tensor([0.0, -0.0, 1e-4, -30.0, 30.0, 90.0, -90.0])]).to(DEV)
    f, d = torch.empty_like(x), torch.empty_like(x)
    _fn_grad_kernel[(1,)](x, f, d, x.numel(), ACT=kernel, BLOCK=256)
    torch.testing.assert_close(f, act.fn(x.double()).float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(d, act.grad(x.double()).float(), rtol=2e-5, atol=2e-6)


def _fails_naming(launch, text: str):
    """``launch`` raises, and ``text`` is in the error or one it chains from (the GPU compiler wraps the
    static_assert's message in a CompilationError that names only the call site; the interpreter does not)."""
    with pytest.raises(Exception) as info:
        launch()
    chain, exc = [], info.value
    while exc is not None and len(chain) < 8:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any(text in m for m in chain), chain


def test_unknown_activation_name_fails_to_compile():
    x = torch.zeros(4, device=DEV)
    _fails_naming(lambda: _fn_grad_kernel[(1,)](x, x.clone(), x.clone(), 4, ACT="swish_typo", BLOCK=4),
                  "unknown activation kernel name")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,  # bf16: GPU only (the interpreter's is not IEEE)
                                   pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", [n for n, f in WEIGHT_FORMATS.items() if f.pack > 1])
def test_decode_matches_the_registry_codec(name, dtype):
    """Every byte value through the Triton decoder against the codec's torch ``decode``, bitwise, in each dot
    dtype (its bit tricks differ per dtype; bf16 arithmetic needs the GPU: the interpreter's is wrong)."""
    fmt = WEIGHT_FORMATS[name]
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    pairs = torch.full((256, 2), float("nan"), dtype=dtype, device=DEV)
    # one warp: 8 bytes a thread, so the GPU's PTX decode runs on whole 4-byte words (both of its halves)
    _decode_kernel[(1,)](q, pairs, 256, W_CODEC=fmt.codec.kernel, BLOCK=256, num_warps=1)
    want = fmt.codec.decode(q.cpu())
    assert torch.equal(pairs.view(-1).cpu().float(), want)
    assert torch.equal(pairs.view(-1).cpu().signbit(), want.signbit())  # -0 stays -0 (mxfp4 code 8)


@pytest.mark.parametrize("name", [n for n, f in WEIGHT_FORMATS.items() if f.scale_dtype == torch.uint8])
def test_decode_scale_matches_the_registry(name):
    """Every stored scale byte (E8M0: 2^(s - 127), 0 a subnormal, 255 NaN) against the codec's ``load_scale``."""
    fmt = WEIGHT_FORMATS[name]
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    out = torch.empty(256, dtype=torch.float32, device=DEV)
    _scale_kernel[(1,)](s, out, 256, W_CODEC=fmt.codec.kernel, BLOCK=256)
    want = fmt.codec.load_scale(s.cpu())
    assert torch.equal(out.cpu().isnan(), want.isnan())
    fin = ~want.isnan()
    assert torch.equal(out.cpu()[fin], want[fin])


def test_unknown_codec_fails_to_compile():
    q = torch.zeros(4, dtype=torch.uint8, device=DEV)
    out = torch.empty(8, device=DEV)
    _fails_naming(lambda: _decode_kernel[(1,)](q, out, 4, W_CODEC="int3", BLOCK=4), "unknown packed weight codec")


@triton.jit
def _value_scale_kernel(s_ptr, out_ptr, n, W_CODEC: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK)
    s = tl.load(s_ptr + j, mask=j < n, other=0)
    tl.store(out_ptr + j, stored_value_scales(s, W_CODEC, out_ptr.dtype.element_ty), mask=j < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [n for n, f in WEIGHT_FORMATS.items() if f.scale_dtype == torch.uint8])
def test_stored_value_scales_are_the_registry_scales_in_the_dot_dtype(name, dtype):
    """Every stored scale byte, straight to the dtype the values are scaled in (bf16: from the byte's bits):
    the registry's ``load_scale`` rounded to that dtype, bit for bit (NaN for 255)."""
    fmt = WEIGHT_FORMATS[name]
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    out = torch.empty(256, dtype=dtype, device=DEV)
    _value_scale_kernel[(1,)](s, out, 256, W_CODEC=fmt.codec.kernel, BLOCK=256)
    want = fmt.codec.load_scale(s.cpu()).to(dtype)
    assert torch.equal(out.cpu().isnan(), want.isnan())
    fin = ~want.isnan()
    assert torch.equal(out.cpu()[fin].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want[fin].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
