"""Triton fused experts (``_kernels.fused_experts``) against ``reference.fused_experts`` (spec §8, §13).

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1``) with tiny shapes, or on a GPU.
Quantized schemes are compared with the reference on the SAME quantized weights, so only kernel error
(accumulation order, intermediates rounded to x's dtype before re-quantization) is measured.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from torch_moe_ops import reference  # noqa: E402
from torch_moe_ops._platform import DEBUG_ENV  # noqa: E402
from torch_moe_ops._kernels.configs import TileConfig  # noqa: E402
from torch_moe_ops._kernels.fused_experts import fused_experts  # noqa: E402
from torch_moe_ops._kernels.gemm import invoke_moe_gemm  # noqa: E402
from torch_moe_ops.reference.quant import quantize_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Rows of GEMM1's buffer for dropped (non-local / out-of-range) pairs are never written; the activation
# runs over their garbage and NumPy warns about overflow there. Those rows are never read again.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SCHEME = {"fp8_tensor": "fp8_tensor", "fp8_channel": "fp8_channel", "fp8_block": "fp8_block",
                 "int8_w8a16": "int8_channel"}
#: ||out - ref|| / ||ref|| bounds. Unquantized: intermediates rounded to x's dtype (bf16 keeps 8 mantissa
#: bits, ~1e-3 per rounding, a handful in sequence) against an fp32 reference: measured ~6e-3 for bf16.
#: fp8 (e4m3, 3 mantissa bits: one step is 1/8 of a binade; the quantization itself costs ~6e-2 here):
#: kernel and reference quantize x identically, but the kernel re-quantizes GEMM1's output after rounding
#: it to x's dtype, so a few percent of elements land one fp8 step apart. Measured on 3 seeds x 3 schemes:
#: bf16 1.0-1.5e-2, fp16 <= 4e-3, fp32 <= 2e-4. Floors at ~2x the worst seen (SQNR >= 32 dB for bf16)
#: still catch any wrong scale or dropped term (a scale 10 % off alone gives ~1e-1).
REL_TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}
REL_TOL_FP8 = {"bf16": 2.5e-2, "fp16": 1e-2, "fp32": 1e-3}


def _routing(T, E_g, k, mode, gen):
    """[T, k] fp32 weights and int32 ids; modes: random, empty (odd experts unused), one (all on 0..k-1)."""
    logits = torch.randn(T, E_g, generator=gen)
    if mode == "empty":
        logits[:, 1::2] = -float("inf")
    if mode == "one":
        logits = torch.arange(E_g, 0, -1, dtype=torch.float32).expand(T, E_g).clone()
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return w.contiguous(), ids.to(torch.int32)


def _weights(E, N, K, gen, strided, scale=0.1):
    """randn/10 [E, N, K]; ``strided`` gives a view with padded row and expert strides."""
    if not strided:
        return torch.randn(E, N, K, generator=gen) * scale
    return (torch.randn(E, N + 3, K + 128, generator=gen) * scale)[:, :N, :K]


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _run_case(T, E, k, H, I, activation="silu", dtype="bf16", scheme="none", routing="random", ep=False,
              bias=False, on_input=False, strided=False, block=(32, 32), limit=0.0, w_scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    gated = not activation.endswith("_no_mul")
    N1 = 2 * I if gated else I
    E_g = 2 * E if ep else E
    x = torch.randn(T, H, generator=gen) / 10
    w13 = _weights(E, N1, H, gen, strided, w_scale)
    w2 = _weights(E, H, I, gen, strided)
    topk_w, topk_ids = _routing(T, E_g, k, routing, gen)
    expert_map = None
    if ep:  # a random half of the global experts is local, in a shuffled order
        expert_map = torch.full((E_g,), -1, dtype=torch.int32)
        expert_map[torch.randperm(E_g, generator=gen)[:E]] = torch.arange(E, dtype=torch.int32)
    b13 = torch.randn(E, N1, generator=gen) / 10 if bias else None
    b2 = torch.randn(E, H, generator=gen) / 10 if bias else None

    s13 = s2 = None
    block_shape = block if scheme == "fp8_block" else None
    if scheme != "none":
        ws = WEIGHT_SCHEME[scheme]
        shards = 2 if scheme == "fp8_tensor" and gated else 1
        if scheme == "fp8_tensor" and activation == "swigluoai":
            # Interleaved gate/up rows (g0, u0, g1, ...): scale column n % 2 (quantize_weight assumes halves).
            s13 = torch.stack([w13[:, 0::2].abs().amax((1, 2)), w13[:, 1::2].abs().amax((1, 2))], 1)
            s13 = s13.clamp_min(1e-4) / 448.0
            q13 = (w13 / s13.repeat(1, I)[:, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            q13, s13 = quantize_weight(w13, ws, block_shape, shards)
        q2, s2 = quantize_weight(w2, ws, block_shape, 1)
        if strided:  # keep the padded strides on the quantized weights too
            q13 = torch.empty(E, N1 + 3, H + 128, dtype=q13.dtype)[:, :N1, :H].copy_(q13)
        w13_ref, w2_ref, w13, w2 = q13, q2, q13, q2
    else:
        w13_ref, w2_ref = w13, w2
        w13, w2 = w13.to(dt), w2.to(dt)

    kwargs = dict(activation=activation, expert_map=expert_map, apply_router_weight_on_input=on_input,
                  activation_limit=limit, block_shape=block_shape)
    # Quantized: the reference quantizes the same x values the kernel sees (x rounded to x's dtype).
    ref = reference.fused_experts(
        x if scheme == "none" else x.to(dt).float(), w13_ref, w2_ref, topk_w, topk_ids, quant_scheme=scheme,
        w13_scale=s13, w2_scale=s2, w13_bias=b13, w2_bias=b2, **kwargs)

    def dev(t):
        return t.to(DEVICE) if t is not None else None

    out = fused_experts(
        dev(x.to(dt)), dev(w13), dev(w2), dev(topk_w), dev(topk_ids), quant_scheme=scheme,
        w13_scale=dev(s13), w2_scale=dev(s2), w13_bias=dev(b13 if b13 is None else b13.to(dt)),
        w2_bias=dev(b2 if b2 is None else b2.to(dt)), **{**kwargs, "expert_map": dev(expert_map)})
    assert out.shape == (T, H) and out.dtype == dt
    return out.cpu(), ref


CASES = [
    # (T, E, k, H, I), kwargs
    pytest.param((1, 4, 2, 40, 24), {}, id="E4-k2-T1-H40-I24-silu"),
    pytest.param((7, 4, 2, 72, 36), {"dtype": "fp16"}, id="E4-k2-T7-H72-I36-silu-fp16"),
    pytest.param((33, 4, 2, 40, 24), {}, id="E4-k2-T33-H40-I24-silu"),
    pytest.param((33, 3, 1, 40, 24), {"dtype": "fp32"}, id="E3-k1-T33-H40-I24-silu-fp32"),
    pytest.param((33, 3, 2, 72, 24), {"activation": "gelu"}, id="E3-k2-T33-H72-I24-gelu"),
    pytest.param((7, 4, 2, 40, 36), {"activation": "gelu_tanh", "dtype": "fp16"}, id="E4-k2-T7-H40-I36-gelu_tanh"),
    pytest.param((7, 4, 2, 40, 24), {"activation": "silu_no_mul"}, id="E4-k2-T7-H40-I24-silu_no_mul"),
    pytest.param((7, 3, 2, 40, 24), {"activation": "gelu_no_mul"}, id="E3-k2-T7-H40-I24-gelu_no_mul"),
    pytest.param((7, 4, 1, 40, 36), {"activation": "gelu_tanh_no_mul"}, id="E4-k1-T7-H40-I36-gelu_tanh_no_mul"),
    pytest.param((7, 4, 2, 72, 24), {"activation": "relu2_no_mul", "dtype": "fp32"},
                 id="E4-k2-T7-H72-I24-relu2_no_mul"),
    pytest.param((7, 4, 2, 40, 24), {"activation": "swigluoai", "limit": 7.0, "bias": True, "w_scale": 1.0},
                 id="E4-k2-T7-H40-I24-swigluoai-L7-bias"),
    pytest.param((7, 4, 2, 40, 24), {"limit": 7.0, "w_scale": 1.0}, id="E4-k2-T7-H40-I24-silu-L7"),
    pytest.param((33, 4, 2, 40, 24), {"routing": "empty"}, id="E4-k2-T33-H40-I24-empty-experts"),
    pytest.param((33, 4, 1, 40, 24), {"routing": "one"}, id="E4-k1-T33-H40-I24-one-expert"),
    pytest.param((33, 4, 2, 40, 24), {"routing": "one", "dtype": "fp16"}, id="E4-k2-T33-H40-I24-same-experts"),
    pytest.param((33, 4, 2, 40, 24), {"ep": True}, id="E4-k2-T33-H40-I24-ep-half-local"),
    pytest.param((7, 4, 2, 40, 24), {"bias": True, "dtype": "fp16"}, id="E4-k2-T7-H40-I24-bias"),
    pytest.param((33, 4, 2, 40, 24), {"on_input": True}, id="E4-k2-T33-H40-I24-weight-on-input"),
    pytest.param((7, 3, 2, 72, 36), {"strided": True}, id="E3-k2-T7-H72-I36-strided"),
    # quantized
    pytest.param((33, 4, 2, 40, 24), {"scheme": "fp8_tensor"}, id="E4-k2-T33-H40-I24-fp8_tensor-E2"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_tensor", "activation": "swigluoai", "limit": 7.0},
                 id="E4-k2-T7-H40-I24-fp8_tensor-E2-interleaved"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_tensor", "activation": "silu_no_mul", "dtype": "fp32"},
                 id="E4-k2-T7-H40-I24-fp8_tensor-E1-no_mul"),
    pytest.param((33, 3, 2, 72, 36), {"scheme": "fp8_channel", "dtype": "fp16"}, id="E3-k2-T33-H72-I36-fp8_channel"),
    pytest.param((7, 4, 2, 40, 24), {"scheme": "fp8_channel", "ep": True, "bias": True},
                 id="E4-k2-T7-H40-I24-fp8_channel-ep-bias"),
    pytest.param((33, 4, 2, 72, 36), {"scheme": "fp8_block", "block": (32, 32)}, id="E4-k2-T33-H72-I36-fp8_block32"),
    pytest.param((7, 3, 2, 40, 24), {"scheme": "fp8_block", "block": (16, 32), "dtype": "fp32", "on_input": True},
                 id="E3-k2-T7-H40-I24-fp8_block16x32-on-input"),
    pytest.param((7, 4, 1, 72, 36), {"scheme": "fp8_block", "block": (32, 32), "strided": True, "routing": "empty"},
                 id="E4-k1-T7-H72-I36-fp8_block32-strided-empty"),
    pytest.param((33, 4, 2, 40, 24), {"scheme": "int8_w8a16"}, id="E4-k2-T33-H40-I24-int8_w8a16"),
    pytest.param((7, 3, 2, 72, 36), {"scheme": "int8_w8a16", "dtype": "fp16", "bias": True, "strided": True},
                 id="E3-k2-T7-H72-I36-int8_w8a16-bias-strided"),
]


@pytest.mark.parametrize("shape,kw", CASES)
def test_fused_experts_matches_reference(shape, kw):
    out, ref = _run_case(*shape, **kw)
    dtype, scheme = kw.get("dtype", "bf16"), kw.get("scheme", "none")
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    if scheme.startswith("fp8"):
        assert err < REL_TOL_FP8[dtype], f"relative error {err:.3g}"
    else:  # int8_w8a16 is exact in the weights (|q| <= 127 fits bf16/fp16), so it gets the plain bounds
        atol = 2e-2 * float(ref.abs().max().clamp_min(1.0))  # spec §13 atol, scaled for the w_scale=1 cases
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
        assert err < REL_TOL[dtype], f"relative error {err:.3g}"


@pytest.fixture
def poison_unwritten(monkeypatch):
    """Debug mode fills the never-written rows of the GEMM2 buffer with NaN: a read of one shows."""
    monkeypatch.setenv(DEBUG_ENV, "1")


def test_out_of_range_ids_contribute_zero(poison_unwritten):
    """ids outside [0, E) (and -1) are dropped by the alignment and skipped by moe_sum: no OOB access, zero
    contribution, their unwritten (NaN-poisoned) buffer rows never read."""
    gen = torch.Generator().manual_seed(1)
    T, E, k, H, I = 7, 4, 2, 40, 24
    x = torch.randn(T, H, generator=gen) / 10
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / 10, torch.randn(E, H, I, generator=gen) / 10
    w, ids = _routing(T, E, k, "random", gen)
    ids[0, 0], ids[3, 1], ids[5, 0] = E, -1, E + 100
    ref = reference.fused_experts(x, w13, w2, w, ids)
    out = fused_experts(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), w.to(DEVICE), ids.to(DEVICE)).cpu()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["none", "fp8_channel"])
def test_non_local_pairs_never_read(poison_unwritten, scheme):
    out, ref = _run_case(33, 4, 3, 40, 24, scheme=scheme, ep=True)
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < (REL_TOL_FP8 if scheme != "none" else REL_TOL)["bf16"]


def test_gemm_minus_one_block_stores_zeros_and_skips_tail():
    """A block whose expert is -1 writes zeros; blocks past num_post_pad and sentinel rows are untouched."""
    cfg = TileConfig(16, 32, 32, 1, 4, 1)
    T, k, N, K, E = 5, 2, 40, 40, 2
    numel = T * k
    a = torch.randn(T, K, device=DEVICE)
    w = torch.randn(E, N, K, device=DEVICE)
    sorted_ids = torch.full((numel + E * 15,), numel, dtype=torch.int32, device=DEVICE)
    sorted_ids[:4] = torch.tensor([0, 3, 4, 9], dtype=torch.int32)  # expert 1
    sorted_ids[16:19] = torch.tensor([1, 2, 5], dtype=torch.int32)  # kept non-local pairs: expert -1
    sorted_ids[32:34] = torch.tensor([6, 7], dtype=torch.int32)  # past num_post_pad: never touched
    expert_ids = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE)
    num_post_pad = torch.tensor([32], dtype=torch.int32, device=DEVICE)
    c = torch.full((numel, N), float("nan"), device=DEVICE)
    invoke_moe_gemm(a, w, c, sorted_ids, expert_ids, num_post_pad, top_k=k, config=cfg)
    c = c.cpu()
    expect = a.cpu()[torch.tensor([0, 3, 4, 9]) // k] @ w.cpu()[1].T
    torch.testing.assert_close(c[[0, 3, 4, 9]], expect, atol=1e-4, rtol=1e-4)
    assert (c[[1, 2, 5]] == 0).all()
    assert c[[6, 7, 8]].isnan().all()


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
class TestFusedExpertsCuda:
    @staticmethod
    def _inputs(T, E, k, H, I, dtype=torch.bfloat16, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=gen) / 10
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype, generator=gen) / 10
        w2 = torch.randn(E, H, I, device="cuda", dtype=dtype, generator=gen) / 10
        logits = torch.randn(T, E, device="cuda", generator=gen)
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        return x, w13, w2, w.contiguous(), ids.to(torch.int32)

    @pytest.mark.parametrize("scheme", ["none", "fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16"])
    def test_large_T(self, scheme):
        T, E, k, H, I = 16384, 8, 2, 1024, 768
        x, w13, w2, w, ids = self._inputs(T, E, k, H, I)
        s13 = s2 = None
        if scheme != "none":
            shards = 2 if scheme == "fp8_tensor" else 1
            w13, s13 = quantize_weight(w13.float(), WEIGHT_SCHEME[scheme], None, shards)
            w2, s2 = quantize_weight(w2.float(), WEIGHT_SCHEME[scheme], None, 1)
        ref = reference.fused_experts(x.float(), w13 if scheme != "none" else w13.float(),
                                      w2 if scheme != "none" else w2.float(), w, ids, quant_scheme=scheme,
                                      w13_scale=s13, w2_scale=s2)
        out = fused_experts(x, w13, w2, w, ids, quant_scheme=scheme, w13_scale=s13, w2_scale=s2)
        err = _rel_err(out, ref)
        if scheme.startswith("fp8"):  # spec §13: fp8 against the same-q reference, atol = rtol = 0.035
            assert err < REL_TOL_FP8["bf16"], err
            torch.testing.assert_close(out.float(), ref, atol=0.035, rtol=0.035)
        else:
            assert err < REL_TOL["bf16"], err
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)

    def test_tuned_configs_compute_correctly(self):
        """Every distinct tile config of the packaged tuned tables, on one small GEMM against torch."""
        from torch_moe_ops._kernels.align import align_block_size
        from torch_moe_ops._kernels.configs import tuned_tables
        from torch_moe_ops.reference.quant import dequantize_activation, dequantize_weight, quantize_activation

        T, E, k, N, K = 200, 4, 2, 384, 640
        x, w, _, _, ids = self._inputs(T, E, k, K, N // 2)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / 10
        seen = set()
        for (_, _, _, _, skey), table in sorted(tuned_tables().items()):
            scheme = "fp8_block" if skey.startswith("fp8_block") else skey
            for cfg in table.values():
                if (scheme, cfg) in seen:
                    continue
                seen.add((scheme, cfg))
                a, a_s, w_q, w_s, bs = x, None, w, None, None
                if scheme != "none":
                    bs = (128, 128) if scheme == "fp8_block" else None
                    if scheme.startswith("fp8"):  # int8_w8a16 keeps bf16 activations
                        a, a_s = quantize_activation(x, "fp8_group" if bs else "fp8_token", 128)
                    w_q, w_s = quantize_weight(w.float(), WEIGHT_SCHEME[scheme], bs, 1)
                c = torch.full((T * k, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                invoke_moe_gemm(a, w_q, c, *align_block_size(ids, E, cfg.block_m), top_k=k, config=cfg,
                                scheme=scheme, a_scale=a_s, w_scale=w_s, block_shape=bs)
                a_ref = a.float() if a_s is None else dequantize_activation(a, a_s, 128)
                w_ref = w_q.float() if w_s is None else dequantize_weight(w_q, w_s, WEIGHT_SCHEME[scheme], bs)
                j = torch.arange(T * k, device="cuda")
                ref = torch.einsum("jk,jnk->jn", a_ref[j // k], w_ref[ids.view(-1).long()])
                assert _rel_err(c, ref) < 1e-2, (scheme, cfg)
        assert seen or not tuned_tables()

    def test_int64_offsets(self):
        """T·k·N1 = 100000·6·4096 > 2³¹ in one GEMM1 launch."""
        T, E, k, H, I = 100000, 8, 6, 1024, 2048
        x, w13, w2, w, ids = self._inputs(T, E, k, H, I, seed=1)
        out = fused_experts(x, w13, w2, w, ids)
        rows = torch.arange(T - 512, T, device="cuda")  # the last tokens have the largest offsets
        rows = torch.cat([torch.arange(512, device="cuda"), rows])
        ref = reference.fused_experts(x[rows].float(), w13.float(), w2.float(), w[rows], ids[rows])
        torch.testing.assert_close(out[rows].float(), ref, atol=2e-2, rtol=0)

    def test_cuda_graph_replay(self):
        T, E, k, H, I = 256, 8, 2, 512, 384
        x, w13, w2, w, ids = self._inputs(T, E, k, H, I)
        fused_experts(x, w13, w2, w, ids)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts(x, w13, w2, w, ids)
        x2, _, _, w2_, ids2 = self._inputs(T, E, k, H, I, seed=3)
        x.copy_(x2), w.copy_(w2_), ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_experts(x, w13, w2, w, ids), atol=0, rtol=0)

    def test_token_sweep_compiles_once(self):
        from torch_moe_ops._kernels.gemm import _moe_gemm_kernel

        def n_compiled():
            return sum(len(c[0]) for c in _moe_gemm_kernel.device_caches.values())

        E, k, H, I = 4, 2, 256, 128
        _, w13, w2, _, _ = self._inputs(1, E, k, H, I)
        # Tokens in one heuristic bucket (33 < T <= 64: same tiles): T must not enter any specialization key.
        x, _, _, w, ids = self._inputs(33, E, k, H, I)
        fused_experts(x, w13, w2, w, ids)
        before = n_compiled()
        for T in (34, 48, 57, 64):
            x, _, _, w, ids = self._inputs(T, E, k, H, I)
            fused_experts(x, w13, w2, w, ids)
        assert n_compiled() == before
