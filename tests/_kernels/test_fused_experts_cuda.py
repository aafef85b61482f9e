"""GPU only: fused experts at real sizes (large T, int64 offsets), every packaged tuned tile config, CUDA
graph replay and one compilation across a token sweep."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from torch_moe_ops import reference  # noqa: E402
from torch_moe_ops._kernels.align import align_block_size  # noqa: E402
from torch_moe_ops._kernels.gemm import invoke_moe_gemm  # noqa: E402
from torch_moe_ops.reference.quant import quantize_weight  # noqa: E402

from ._experts import REL_TOL, REL_TOL_FP8, WEIGHT_SCHEME, _rel_err, fused_experts  # noqa: E402


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

    @pytest.mark.parametrize("scheme", ["none", "fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16"])
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
        if scheme.startswith("fp8"):  # §13: fp8 against the same-q reference, atol = rtol = 0.035
            assert err < REL_TOL_FP8["bf16"], err
            torch.testing.assert_close(out.float(), ref, atol=0.035, rtol=0.035)
        else:
            assert err < REL_TOL["bf16"], err
            torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)

    def test_tuned_configs_compute_correctly(self):
        """Every distinct tile config of the packaged tuned tables, on one small GEMM against torch."""
        from torch_moe_ops._kernels.configs import tuned_tables
        from torch_moe_ops.reference.quant import dequantize_activation, dequantize_weight, quantize_activation

        from torch_moe_ops.schemes import QUANT_SCHEMES

        T, E, k, N, K = 200, 4, 2, 384, 640
        x, w, _, _, ids = self._inputs(T, E, k, K, N // 2)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / 10
        def scheme_of(key: str):  # table key -> (scheme, its scale tile): "<name>" or "<name>_<rows>x<cols>"
            for sch in QUANT_SCHEMES.values():
                if not sch.tiled and key == sch.name:
                    return sch, None
                if sch.tiled and key.startswith(sch.name + "_"):
                    bs = tuple(int(v) for v in key[len(sch.name) + 1:].split("x"))
                    if sch.table_key(bs) == key:
                        return sch, bs
            raise AssertionError(f"a tuned table's key names no scheme: {key}")

        seen = set()
        for (_, _, _, _, skey), table in sorted(tuned_tables().items()):
            scheme, bs = scheme_of(skey)
            for cfg in table.values():
                if (scheme.name, cfg) in seen:
                    continue
                seen.add((scheme.name, cfg))
                a, a_s, w_q, w_s = x, None, w, None
                if scheme.fp8_dot:  # weight-only schemes keep bf16 activations
                    a, a_s = quantize_activation(x, scheme.act, scheme.act_group(bs))
                if scheme.quantized:
                    w_q, w_s = quantize_weight(w.float(), scheme.weight, bs, 1)
                c = torch.full((T * k, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                invoke_moe_gemm(a, w_q, c, *align_block_size(ids, E, cfg.block_m), top_k=k, config=cfg,
                                scheme=scheme, a_scale=a_s, w_scale=w_s, block=bs)
                a_ref = a.float() if a_s is None else dequantize_activation(a, a_s, scheme.act_group(bs))
                w_ref = w_q.float() if w_s is None else dequantize_weight(w_q, w_s, scheme.weight, bs)
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
