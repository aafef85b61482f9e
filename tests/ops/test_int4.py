"""The int4 weight-only scheme through the ops (docs/design.md §3): ``quantize_weight(w, "int4_group")``
bit-exact against the group-by-group oracle, ``quantize_weight_into``, bad input, opcheck, and compile with no
recompiles. ``fused_experts(..., quant_scheme="int4_w4a16")`` numerics live in test_fused_experts.py.

Weight SQNR floor, int4 with G gaussian values per group: the step is amax/7 with amax ~2.1-2.6 sigma for
G = 32..128, uniform rounding noise step^2/12 -> ~19.5-21 dB; measured 19.6-21.3 dB on these shapes. 17 dB
keeps a margin; a wrong nibble order or sign gives ~0 dB or less."""
import pytest
import torch
from torch.library import opcheck

from . import oracle
import torch_moe_ops
from torch_moe_ops.testing import random_moe_weights, sqnr_db

from ._data import padded, random_ids, random_weights
from .test_contract import UTILS, _compile_run

SQNR_FLOOR_DB = 17.0


def _check(w, G, sqnr=True):
    with torch.inference_mode():
        q, s = torch_moe_ops.quantize_weight(w, "int4_group", block_shape=[1, G])
    oq, os_ = oracle.quantize_int4(w, G)
    assert q.dtype == torch.uint8 and q.shape == (*w.shape[:-1], w.shape[-1] // 2) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (*w.shape[:-1], w.shape[-1] // G) and s.is_contiguous()
    torch.testing.assert_close(s, os_, rtol=1e-6, atol=0)
    assert torch.equal(q, oq), f"q differs in {(q != oq).sum()} bytes"
    assert torch.isfinite(s).all() and (s >= 0).all()
    if sqnr:
        q3, s3 = (q[None], s[None]) if q.dim() == 2 else (q, s)
        deq = oracle.dequantize_int4(q3, s3, G).reshape(w.shape)
        db = sqnr_db(w.float(), deq)
        assert db > SQNR_FLOOR_DB, f"int4 G={G}: weight SQNR {db:.1f} dB"
    return q, s


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("shape", [(3, 81, 256), (2, 16, 128), (77, 384)], ids=["E3-N81-K256", "E2-N16-K128", "2D"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_quantize_int4(G, shape, dtype):
    _check((torch.randn(shape) / 10).to(dtype), G)


def test_default_group_is_128():
    w = torch.randn(2, 8, 256)
    q, s = torch_moe_ops.quantize_weight(w, "int4_group")
    assert s.shape == (2, 8, 2)
    q2, s2 = torch_moe_ops.quantize_weight(w, "int4_group", block_shape=[1, 128])
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_zero_groups_and_rounding():
    """All-zero groups: scale 0 and q 0, never NaN. Nibbles: element 2j low, 2j + 1 high, two's complement;
    round half to even; amax maps to +-7."""
    w = torch.zeros(1, 2, 64)
    w[0, 0, :32] = torch.tensor([7.0, -7.0, 3.5, 2.5, -2.5, -0.5, 1.0, 0.0] * 4)  # scale 1 for this group
    q, s = _check(w, 32, sqnr=False)
    assert s[0, 0].tolist() == [1.0, 0.0] and s[0, 1].tolist() == [0.0, 0.0]
    assert (q[0, 0, 16:] == 0).all() and (q[0, 1] == 0).all()
    low, high = (q[0, 0, :4] & 0xF).tolist(), (q[0, 0, :4] >> 4).tolist()
    # 7 | -7 -> 0x9 ; 3.5 -> 4 | 2.5 -> 2 ; -2.5 -> -2 (0xE) | -0.5 -> -0 ; 1 | 0
    assert low == [7, 4, 14, 1] and high == [9, 2, 0, 0]
    w = torch.zeros(1, 1, 32)
    w[0, 0, 3] = float("nan")  # a non-finite weight is refused on CPU, never folded into a scale
    with pytest.raises(ValueError, match=r"w has non-finite values \(first at index \[0, 0, 3\]"):
        torch_moe_ops.quantize_weight(w, "int4_group", block_shape=[1, 32])


def test_strided_and_into():
    w = padded(torch.randn(2, 40, 128) / 10)
    q, s = _check(w, 64)
    qw = torch.full((2, 40, 64), 0xAB, dtype=torch.uint8)
    sc = torch.full((2, 40, 2), -1.0)
    ptrs = qw.data_ptr(), sc.data_ptr()
    torch_moe_ops.quantize_weight_into(w, qw, sc, "int4_group", block_shape=[1, 64])
    assert torch.equal(qw, q) and torch.equal(sc, s) and (qw.data_ptr(), sc.data_ptr()) == ptrs


@pytest.mark.parametrize("call,match", [
    (lambda: torch_moe_ops.quantize_weight(torch.randn(2, 8, 100), "int4_group", block_shape=[1, 32]),
     "K = 100 is not divisible by the group size 32"),
    (lambda: torch_moe_ops.quantize_weight(torch.randn(2, 8, 128), "int4_group", block_shape=[1, 48]),
     r"\[1, G\] with G in \(32, 64, 128\)"),
    (lambda: torch_moe_ops.quantize_weight(torch.randn(2, 8, 128), "int4_group", block_shape=[2, 32]),
     r"\[1, G\]"),
    (lambda: torch_moe_ops.quantize_weight(torch.randn(2, 8, 128), "int4_group", shards=2),
     "shards > 1 is only meaningful for fp8_tensor"),
    (lambda: torch_moe_ops.quantize_weight(torch.randn(2, 8, 128), "int3"), r"scheme must be one of .*alias.*int4"),
    (lambda: torch_moe_ops.quantize_weight_into(torch.randn(2, 8, 128), torch.empty(2, 8, 128, dtype=torch.uint8),
                                                torch.empty(2, 8, 1), "int4_group"),
     r"qweight must have shape \[2, 8, 64\] \(w's shape with K / 2"),
    (lambda: torch_moe_ops.quantize_weight_into(torch.randn(2, 8, 128), torch.empty(2, 8, 64, dtype=torch.int8),
                                                torch.empty(2, 8, 1), "int4_group"), "qweight must have dtype"),
    (lambda: torch_moe_ops.quantize_weight_into(torch.randn(2, 8, 128), torch.empty(2, 8, 64, dtype=torch.uint8),
                                                torch.empty(2, 8, 2), "int4_group"), r"scale must have shape \[2, 8, 1\]"),
], ids=["K-not-multiple", "G48", "bn2", "shards", "unknown-scheme", "unpacked-qweight", "qweight-dtype", "scale-shape"])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


E, H, I, T, K = 5, 64, 32, 7, 2


def _experts(G=32, dtype=torch.bfloat16):
    w13, w2, b13, b2 = random_moe_weights(E, H, I, dtype=torch.float32, bias=True)
    (q13, s13), (q2, s2) = (torch_moe_ops.quantize_weight(w, "int4_group", block_shape=[1, G]) for w in (w13, w2))
    return q13, q2, s13, s2, b13.to(dtype), b2.to(dtype)


def test_fused_experts_bad_input():
    q13, q2, s13, s2, _, _ = _experts()
    x, w, ids = torch.randn(T, H).bfloat16(), random_weights(T, K), random_ids(T, K, E)
    kw = dict(quant_scheme="int4_w4a16", w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match=r"w2's I = 32 must be divisible by the group size 64"):
        torch_moe_ops.fused_experts(x, q13, q2, w, ids, block_shape=[1, 64], **kw)
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[5, 64, 2\]"):  # G = 64 scales, G = 32 told
        torch_moe_ops.fused_experts(x, q13, q2, w, ids, block_shape=[1, 32], **{**kw, "w13_scale": s13[..., :1].contiguous()})
    with pytest.raises(TypeError, match="w13 must have dtype uint8 for quant_scheme='int4_w4a16'"):
        torch_moe_ops.fused_experts(x, q13.view(torch.int8), q2, w, ids, block_shape=[1, 32], **kw)
    with pytest.raises(ValueError, match=r"w13 must be \[E, N1, H=64\] \(2 values per byte"):
        torch_moe_ops.fused_experts(x, q13[..., :16], q2, w, ids, block_shape=[1, 32], **kw)
    with pytest.raises(ValueError, match="needs w13_scale"):
        torch_moe_ops.fused_experts(x, q13, q2, w, ids, block_shape=[1, 32], quant_scheme="int4_w4a16")


def test_opcheck_int4():
    moe = torch.ops.moe
    q13, q2, s13, s2, b13, b2 = _experts()
    x = torch.randn(T, H).bfloat16() / 10
    opcheck(moe.quantize_weight.default, (torch.randn(3, 40, 64), "int4_group", [1, 32]), {}, test_utils=UTILS)
    opcheck(moe.quantize_weight_into.default,
            (torch.randn(3, 40, 64), torch.empty(3, 40, 32, dtype=torch.uint8), torch.empty(3, 40, 2), "int4_group",
             [1, 32]), {}, test_utils=UTILS)
    opcheck(moe.fused_experts.default, (x, q13, q2, random_weights(T, K), random_ids(T, K, E), "silu", "int4_w4a16",
                                        s13, s2, b13, b2, [1, 32]), {}, test_utils=UTILS)
    opcheck(moe.fused_moe.default, (x, torch.randn(T, E), q13, q2, K, True, "softmax", 0, 0, None, 1.0, "silu",
                                    "int4_w4a16", s13, s2, None, None, [1, 32]), {}, test_utils=UTILS)


def test_compile_int4_no_recompiles():
    q13, q2, s13, s2, _, _ = _experts()
    gate = (torch.randn(E, H) / 10).bfloat16()

    def fn(x, gate, q13, q2, s13, s2):
        return torch_moe_ops.fused_moe(x, x @ gate.t(), q13, q2, K, quant_scheme="int4_w4a16", w13_scale=s13,
                                       w2_scale=s2, block_shape=[1, 32])

    _compile_run(fn, lambda t: (torch.randn(t, H).bfloat16() / 10, gate, q13, q2, s13, s2))
