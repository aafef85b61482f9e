"""Pre-quantized mxfp4 pieces through ``weight_loader`` (``layer/loading/prequantized.py``): GPT-OSS's packed
bytes ``[E, N, K/2]`` and E8M0 scale bytes ``[E, N, K/32]`` are written bitwise (never re-quantized, never
dequantized), fused or per expert and shard, sliced per TP rank in storage units; a NaN scale byte, an fp8 weight
or uint8 bytes into another layer are refused before anything is written."""
import pytest
import torch

import torch_moe_ops as moe
from torch_moe_ops.layer.loading import ExpertLayout, LoadTargets, WeightLoader
from torch_moe_ops.schemes import get_activation

E, K, H, I = 4, 2, 64, 96


def _source(activation="swigluoai", i=I):
    """A layer quantized online from bf16 weights: its storage is what a pre-quantized checkpoint holds."""
    torch.manual_seed(0)
    src = moe.FusedMoE(E, K, H, i, quant_config=moe.Mxfp4Config(), activation=activation)
    src.load_weights(torch.randn(E, 2 * i, H).bfloat16() * 0.1, torch.randn(E, H, i).bfloat16() * 0.1)
    return src


def _same(a: moe.FusedMoE, b: moe.FusedMoE) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_fused_all_expert_pieces_are_written_bitwise():
    src = _source()
    dst = moe.FusedMoE(E, K, H, I, quant_config=moe.Mxfp4Config(), activation="swigluoai")
    blocks = src.w13_weight.view(E, 2 * I, H // 32, 16)  # GPT-OSS's file layout
    dst.weight_loader(dst.w13_weight, blocks.reshape(E, 2 * I, H // 2))
    dst.weight_loader(dst.w13_weight_scale, src.w13_weight_scale.clone())
    dst.weight_loader(dst.w2_weight, src.w2_weight.clone(), shard_id="w2")
    dst.weight_loader(dst.w2_weight_scale, src.w2_weight_scale.clone(), shard_id="w2")
    assert dst.finalize_loading() == "loaded" and _same(dst, src)


def test_per_expert_gate_up_pieces_and_a_reload_keep_storage():
    src = _source("silu")
    dst = moe.FusedMoE(E, K, H, I, quant_config=moe.Mxfp4Config(), activation="silu")
    ptrs = [p.data_ptr() for p in dst.parameters()]
    for round_ in range(2):
        for e in range(E):
            for shard, rows in (("w1", slice(0, I)), ("w3", slice(I, 2 * I))):
                dst.weight_loader(dst.w13_weight, src.w13_weight[e, rows], shard_id=shard, expert_id=e)
                dst.weight_loader(dst.w13_weight_scale, src.w13_weight_scale[e, rows], shard_id=shard, expert_id=e)
            dst.weight_loader(dst.w2_weight, src.w2_weight[e], shard_id="w2", expert_id=e)
            dst.weight_loader(dst.w2_weight_scale, src.w2_weight_scale[e], shard_id="w2", expert_id=e)
        assert dst.finalize_loading() == ("loaded" if round_ == 0 else "unchanged")
    assert _same(dst, src) and [p.data_ptr() for p in dst.parameters()] == ptrs


def test_refusals_write_nothing():
    src = _source("silu")
    dst = moe.FusedMoE(E, K, H, I, quant_config=moe.Mxfp4Config(), activation="silu")
    before = [p.clone() for p in dst.parameters()]
    bad = src.w2_weight_scale[0].clone()
    bad[3, 1] = 255
    with pytest.raises(ValueError, match=r"w2_weight_scale expert 0 shard 'w2': non-finite values \(first at index \[3, 1\]: nan\).*"
                                        r"wrote nothing"):
        dst.weight_loader(dst.w2_weight_scale, bad, shard_id="w2", expert_id=0)
    with pytest.raises(TypeError, match=r"weight scales must be uint8 \(E8M0 bytes\), got torch.float32"):
        dst.weight_loader(dst.w2_weight_scale, bad.float(), shard_id="w2", expert_id=0)
    with pytest.raises(TypeError, match=r"float8_e4m3fn weight cannot fill this layer: its quant_config is "
                                        r"Mxfp4Config\(\)"):
        dst.weight_loader(dst.w2_weight, torch.zeros(H, I, dtype=torch.float8_e4m3fn), shard_id="w2", expert_id=0)
    with pytest.raises(ValueError, match=r"expected shape \[64, 48\], got \[64, 96\]"):  # logical, not packed
        dst.weight_loader(dst.w2_weight, torch.zeros(H, I, dtype=torch.uint8), shard_id="w2", expert_id=0)
    assert all(torch.equal(a, b) for a, b in zip(before, dst.parameters())) and dst.load_state == "fresh"
    fp8 = moe.FusedMoE(E, K, H, I, quant_config="fp8_block")
    with pytest.raises(TypeError, match=r"got torch.uint8 \(uint8 weights are pre-quantized mxfp4 bytes"):
        fp8.weight_loader(fp8.w2_weight, src.w2_weight[0], shard_id="w2", expert_id=0)


def test_tensor_parallel_ranks_take_their_slice_in_storage_units():
    """Through the loader alone: each of 2 TP ranks holds its I slice of the packed bytes and scale bytes
    (I / tp is a multiple of 32: the groups never straddle ranks)."""
    If = 128
    src, qc = _source("silu", If), moe.Mxfp4Config()

    def loader(rank, tp):
        lay = ExpertLayout(E, E, H, If, If // tp, get_activation("silu"), torch.bfloat16, tp_rank=rank, tp_size=tp)
        Il = If // tp
        params = {"w13_weight": torch.empty(E, 2 * Il, H // 2, dtype=torch.uint8),
                  "w2_weight": torch.empty(E, H, Il // 2, dtype=torch.uint8),
                  "w13_weight_scale": torch.zeros(qc.scale_shape(E, 2 * Il, H, 1), dtype=torch.uint8),
                  "w2_weight_scale": torch.zeros(qc.scale_shape(E, H, Il, 1), dtype=torch.uint8),
                  "w13_bias": None, "w2_bias": None, "e_score_correction_bias": None}
        wl, targets = WeightLoader(lay, qc, lambda: f"rank {rank}"), LoadTargets(params, {}, lambda e: [e])
        for p, shard in (("w13", None), ("w2", "w2")):
            wl.load(targets, p + "_weight", getattr(src, p + "_weight").clone(), shard)
            wl.load(targets, p + "_weight_scale", getattr(src, p + "_weight_scale").clone(), shard)
        assert wl.finalize() == "loaded"
        return params

    full = loader(0, 1)
    assert torch.equal(full["w13_weight"], src.w13_weight) and torch.equal(full["w2_weight_scale"], src.w2_weight_scale)
    for rank in (0, 1):
        part, lo, hi = loader(rank, 2), rank * If // 2, (rank + 1) * If // 2
        rows = list(range(lo, hi)) + list(range(If + lo, If + hi))
        assert torch.equal(part["w13_weight"], full["w13_weight"][:, rows])
        assert torch.equal(part["w13_weight_scale"], full["w13_weight_scale"][:, rows])
        assert torch.equal(part["w2_weight"], full["w2_weight"][:, :, lo // 2 : hi // 2])
        assert torch.equal(part["w2_weight_scale"], full["w2_weight_scale"][:, :, lo // 32 : hi // 32])
