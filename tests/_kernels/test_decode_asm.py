"""The PTX of the 4-bit decode for 16-bit dots (``_kernels/formats.py``: ``_FP4_BF16_PTX``, ``_INT4_BF16_PTX``,
``_INT4_FP16_PTX``), run by a small emulator of the instructions it uses, against the registry codecs on every
byte value in every position of the 32-bit word (the GPU suite checks the compiled kernel bitwise too:
``test_elementwise.py``, bf16 and fp16). The emulator reads the very strings the kernels inline, so an edit to
them is checked here, without a GPU."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from torch_moe_ops._kernels import formats  # noqa: E402
from torch_moe_ops.schemes import WEIGHT_FORMATS  # noqa: E402

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> 4 * i) & 0xF
        assert nib < 8, "sign-replicating selectors are not emulated"
        out |= src[nib] << 8 * i
    return out


def run_ptx(ptx: str, word: int) -> list[int]:
    """The asm block on input ``$4 = word``: its outputs $0..$3 (the subset of PTX the block uses)."""
    regs = {"$4": word}
    val = lambda x: regs[x] if x in regs else int(x, 0)  # noqa: E731
    body = ptx.strip().strip("{}")
    for stmt in (s.strip() for s in body.split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        v = [val(s) for s in src]
        if op == "mov.b32":
            r = v[0]
        elif op == "prmt.b32":
            r = _prmt(v[0], v[1], v[2])
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "mul.lo.u32":
            r = v[0] * v[1]
        else:
            raise AssertionError(f"instruction not emulated: {op}")
        regs[d] = r & M32
    return [regs[f"${i}"] for i in range(4)]


def _halves(bits: list[int], dtype) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype).float()


@pytest.mark.parametrize("name,ptx,post,dtype", [
    ("mxfp4", formats._FP4_BF16_PTX, lambda v: v * 2.0 ** 126, torch.bfloat16),
    ("int4_group", formats._INT4_BF16_PTX, lambda v: v - 136, torch.bfloat16),
    ("int4_group", formats._INT4_FP16_PTX, lambda v: v - 1032, torch.float16)])
def test_decode_ptx_matches_the_codec_for_every_byte_in_every_position(name, ptx, post, dtype):
    codec = WEIGHT_FORMATS[name].codec
    ptx = ptx.value  # the string the kernel inlines
    for pos in range(4):
        for byte in range(256):
            bytes_ = [(byte + 37 * i) % 256 if i != pos else byte for i in range(4)]
            lo0, lo1, hi0, hi1 = run_ptx(ptx, sum(b << 8 * i for i, b in enumerate(bytes_)))
            lo = _halves([lo0 & 0xFFFF, lo0 >> 16, lo1 & 0xFFFF, lo1 >> 16], dtype)  # elements 0..3 (little-endian)
            hi = _halves([hi0 & 0xFFFF, hi0 >> 16, hi1 & 0xFFFF, hi1 >> 16], dtype)
            got = torch.stack([post(lo), post(hi)], dim=1).reshape(-1)  # even k, odd k per byte
            want = codec.decode(torch.tensor(bytes_, dtype=torch.uint8)).float()
            assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), (name, bytes_)
