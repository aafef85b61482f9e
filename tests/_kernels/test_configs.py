"""Tile configs (``_kernels.configs``): docs/design.md §8.1 heuristics, tuned-table lookup (§12.6), interpreter
tiles. The functions take ``QuantScheme`` objects and canonical scale tiles, as the launchers pass them."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("triton")

from torch_moe_ops._kernels import configs  # noqa: E402
from torch_moe_ops._kernels.configs import TileConfig, default_config, get_config, lookup_tuned  # noqa: E402
from torch_moe_ops.schemes import QUANT_SCHEMES  # noqa: E402

NONE, FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK, INT8, INT4 = (
    QUANT_SCHEMES[n] for n in ("none", "fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16"))

CUDA0 = torch.device("cuda", 0)


def test_tile_config_is_frozen_and_round_trips():
    cfg = TileConfig(64, 128, 64, 16, 8, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_m = 32
    assert TileConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "T,expect",
    [  # Mixtral: E=8, k=2, so rows per expert r = T/4; BLOCK_M ~ next_pow2(2r) in [16, 128]
        pytest.param(1, TileConfig(16, 64, 128, 1, 4, 4), id="T1"),
        pytest.param(32, TileConfig(16, 64, 128, 1, 4, 4), id="T32"),
        pytest.param(64, TileConfig(32, 64, 128, 1, 4, 4), id="T64"),
        pytest.param(96, TileConfig(64, 128, 128, 1, 4, 3), id="T96"),
        pytest.param(512, TileConfig(128, 256, 64, 1, 8, 4), id="T512"),
        pytest.param(4096, TileConfig(128, 256, 64, 16, 8, 4), id="T4096"),
    ],
)
def test_default_heuristic_bf16(T, expect):
    assert default_config(T, 8, 28672, 4096, NONE, top_k=2) == expect


def test_group_m_once_an_expert_spans_two_row_blocks():
    assert default_config(256, 128, 1536, 2048, NONE, top_k=8).group_m == 1  # 16 rows per expert
    assert default_config(4096, 128, 1536, 2048, NONE, top_k=8).group_m == 16  # 256 rows per expert


def test_default_heuristic_fp8():
    assert default_config(4096, 8, 28672, 4096, FP8_CHANNEL, top_k=2).block_k == 128  # fp8 always BK 128
    assert default_config(1, 128, 2048, 768, FP8_CHANNEL, top_k=8).num_stages == 3
    # fp8 with a handful of rows takes 128-wide column tiles (Qwen3 fp8_tensor T=1 GEMM1: 114.5 -> 21.6 us)
    assert default_config(1, 128, 1536, 2048, FP8_TENSOR, top_k=8).block_n == 128
    assert default_config(64, 128, 1536, 2048, FP8_TENSOR, top_k=8).block_n == 64  # 512 rows: narrower again
    assert default_config(1, 128, 1536, 2048, NONE, top_k=8).block_n == 64  # bf16 decode unchanged
    assert default_config(8, 256, 4096, 7168, FP8_BLOCK, top_k=2) == TileConfig(16, 128, 128, 1, 4, 3)
    assert default_config(1024, 256, 4096, 7168, FP8_BLOCK, top_k=2) == TileConfig(64, 128, 128, 32, 4, 3)
    # BLOCK_K must divide the block's K size
    assert default_config(8, 4, 256, 256, FP8_BLOCK, (64, 64), top_k=2).block_k == 64
    assert default_config(8, 4, 256, 256, FP8_BLOCK, (128, 96), top_k=2).block_k == 32
    with pytest.raises(ValueError, match=r"block_shape\[1\] = 16"):  # an fp8 dot needs K >= 32 on the GPU
        default_config(8, 4, 256, 256, FP8_BLOCK, (16, 16), top_k=2)


def test_default_heuristic_shrinks_for_tiny_dims():
    cfg = default_config(4096, 4, 40, 24, NONE, top_k=2)
    assert (cfg.block_n, cfg.block_k) == (64, 32)


def test_interpreter_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = get_config(33, 4, 48, 40, NONE, None, torch.device("cpu"), top_k=2)
    assert cfg.block_m == 16 and cfg.block_n <= 32 and cfg.block_k <= 32
    assert get_config(33, 4, 48, 40, FP8_BLOCK, (16, 16), torch.device("cpu"), top_k=2).block_k == 16


def test_lookup_picks_smallest_tuned_T_at_least_T():
    table = {1: TileConfig(16, 64, 128), 64: TileConfig(32, 64, 128), 1024: TileConfig(128, 128, 64)}
    assert lookup_tuned(table, 1) == table[1]
    assert lookup_tuned(table, 2) == table[64]
    assert lookup_tuned(table, 64) == table[64]
    assert lookup_tuned(table, 65) == table[1024]
    assert lookup_tuned(table, 100000) == table[1024]  # beyond the table: the largest, never a small-T one
    decode = {1: table[1], 16: table[64]}  # tuned for decode only: larger T get the heuristic (None here)
    assert lookup_tuned(decode, 16) == table[64] and lookup_tuned(decode, 17) is None


def test_a_decode_only_table_leaves_prefill_to_the_heuristic(tmp_path, monkeypatch):
    """A table tuned at T = 1 and 16 (benchmarks/gpu_tune.sh's default) serves decode; prefill keeps the
    heuristic's tiles instead of the T = 16 decode tile."""
    from torch_moe_ops._kernels import configs

    int4 = QUANT_SCHEMES["int4_w4a16"]
    entry = {"E": 32, "N": 2880, "K": 2880, "scheme": int4.table_key((1, 64)),
             "configs": {"1": TileConfig(16, 16, 64, 1, 4, 3).to_dict(), "16": TileConfig(16, 128, 64, 1, 4, 4).to_dict()}}
    _write_table(tmp_path, "dev", [entry])
    args = (32, 2880, 2880, int4, (1, 64), 4, "dev", None, str(tmp_path))
    assert configs._cuda_config(1, *args).block_n == 16
    assert configs._cuda_config(4096, *args) == configs._cuda_config(4096, 32, 2880, 2880, int4, (1, 64), 4, "other",
                                                                     None, str(tmp_path))


def _write_table(tmp_path, device, entries):
    (tmp_path / "dev.json").write_text(json.dumps({"device": device, "entries": entries}))


def test_get_config_reads_tuned_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(configs, "device_name", lambda index: "Fake GPU")
    monkeypatch.setenv(configs.TUNED_DIR_ENV, str(tmp_path))
    small, big = TileConfig(16, 32, 256, 1, 4, 5), TileConfig(128, 256, 64, 8, 8, 4)
    _write_table(tmp_path, "Fake GPU", [
        {"E": 8, "N": 1024, "K": 512, "scheme": "none", "configs": {"16": small.to_dict(), "2048": big.to_dict()}},
        {"E": 8, "N": 1024, "K": 512, "scheme": "fp8_block_128x128",
         "configs": {"16": dataclasses.replace(small, block_k=256).to_dict()}},
    ])
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == small
    assert get_config(17, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == big
    assert get_config(9999, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == big
    # other shape, scheme or device: heuristic
    assert get_config(3, 8, 1024, 256, NONE, None, CUDA0, top_k=2) == default_config(3, 8, 1024, 256, NONE, top_k=2)
    expect = default_config(3, 8, 1024, 512, FP8_CHANNEL, top_k=2)
    assert get_config(3, 8, 1024, 512, FP8_CHANNEL, None, CUDA0, top_k=2) == expect
    monkeypatch.setattr(configs, "device_name", lambda index: "Other GPU")
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == default_config(3, 8, 1024, 512, NONE, top_k=2)


def test_same_family_table_serves_a_gpu_without_its_own(tmp_path, monkeypatch):
    """An H200 with no table takes an H100's (same compute capability); its own table wins once it has one;
    another family, or a file that names no capability, gives the heuristic."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(configs, "device_name", lambda index: "Fake H200")
    monkeypatch.setattr(configs, "device_family", lambda index: "sm90")
    monkeypatch.setenv(configs.TUNED_DIR_ENV, str(tmp_path))
    h100, h200 = TileConfig(16, 32, 256, 1, 4, 5), TileConfig(32, 64, 128, 1, 4, 3)
    entry = dict(E=8, N=1024, K=512, scheme="none")
    (tmp_path / "a.json").write_text(json.dumps({"device": "Fake H100", "capability": [9, 0],
                                                 "entries": [dict(entry, configs={"16": h100.to_dict()})]}))
    heuristic = default_config(3, 8, 1024, 512, NONE, top_k=2)
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == h100
    monkeypatch.setattr(configs, "device_family", lambda index: "sm100")
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == heuristic
    monkeypatch.setattr(configs, "device_family", lambda index: "sm90")
    (tmp_path / "b.json").write_text(json.dumps({"device": "Fake H200",
                                                 "entries": [dict(entry, configs={"16": h200.to_dict()})]}))
    configs._cuda_config.cache_clear(), configs._load_tables.cache_clear()  # (lookups are cached per process)
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == h200
    (tmp_path / "c.json").write_text(json.dumps({"device": "Fake H800", "capability": [9, 0],  # same family
                                                 "entries": [dict(entry, configs={"1": h200.to_dict()})]}))
    (tmp_path / "b.json").unlink()
    configs._cuda_config.cache_clear(), configs._load_tables.cache_clear()
    got = configs._load_tables(tuple(configs._tuned_files(str(tmp_path))))[("sm90", 8, 1024, 512, "none")]
    assert got == {16: h100}  # one device's table (the first file's), not the H100's and the H800's merged
    (tmp_path / "c.json").unlink()
    (tmp_path / "a.json").write_text(json.dumps({"device": "Fake H100",  # no capability: no family entry
                                                 "entries": [dict(entry, configs={"16": h100.to_dict()})]}))
    configs._cuda_config.cache_clear(), configs._load_tables.cache_clear()
    assert get_config(3, 8, 1024, 512, NONE, None, CUDA0, top_k=2) == heuristic


def test_get_config_rejects_unusable_tuned_entry(tmp_path, monkeypatch):
    """A tuned BLOCK_K that does not divide the fp8 block falls back to the heuristic."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(configs, "device_name", lambda index: "Fake GPU")
    monkeypatch.setenv(configs.TUNED_DIR_ENV, str(tmp_path))
    _write_table(tmp_path, "Fake GPU", [{"E": 8, "N": 1024, "K": 512, "scheme": "fp8_block_128x128",
                                         "configs": {"16": TileConfig(16, 32, 256).to_dict()}}])
    got = get_config(3, 8, 1024, 512, FP8_BLOCK, (128, 128), CUDA0, top_k=2)
    assert got == default_config(3, 8, 1024, 512, FP8_BLOCK, (128, 128), top_k=2)


def test_packaged_tables_parse():
    for path in configs._tuned_files():
        data = json.loads(path.read_text())
        assert isinstance(data["device"], str)
        assert len(data["capability"]) == 2, path  # so a GPU of the same family without a table can use it
        for entry in data["entries"]:
            for t, cfg in entry["configs"].items():
                assert int(t) >= 1
                TileConfig.from_dict(cfg)


def test_fp8_block_k_floor_for_tiny_k():
    """An fp8 tl.dot needs K >= 32 on the GPU: a tiny K keeps BLOCK_K = 32 and is masked instead."""
    for scheme in (FP8_TENSOR, FP8_CHANNEL):
        assert default_config(1, 2, 8, 4, scheme, top_k=1).block_k == 32
    assert default_config(1, 2, 8, 4, FP8_BLOCK, (32, 32), top_k=1).block_k == 32
    assert default_config(1, 2, 8, 4, NONE, top_k=1).block_k == 16


# ---------------------------------------------------------------------------------------------- int4 / keys


def test_table_keys_come_from_the_scheme_objects():
    """The packaged JSON keys are what ``scheme.table_key(block)`` produces (none, fp8_*, int8, int4)."""
    assert NONE.table_key(None) == "none" and INT8.table_key(None) == "int8_w8a16"
    assert FP8_TENSOR.table_key(None) == "fp8_tensor" and FP8_CHANNEL.table_key(None) == "fp8_channel"
    assert FP8_BLOCK.table_key((128, 128)) == "fp8_block_128x128"
    assert INT4.table_key((1, 32)) == "int4_w4a16_1x32" and INT4.table_key((1, 128)) == "int4_w4a16_1x128"
    valid = {s.table_key(s.block_shape(None) if s.tiled else None) for s in QUANT_SCHEMES.values()}
    valid.add(INT4.table_key((1, 64)))  # GPT-OSS-20B's K = 2880 takes groups of 64 (testing.fitting_block)
    keys = {entry["scheme"] for path in configs._tuned_files() for entry in json.loads(path.read_text())["entries"]}
    assert keys and keys <= valid, keys - valid


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_block_k_fits_the_group(G):
    """int4: 16 x 128 tiles up to 64 rows per expert, 128 x 64 tiles on the 16-bit BLOCK_M beyond; BLOCK_K
    divides G or is a multiple of it (gemm._packed_step scales before the dot then), and BLOCK_K >= 32 (one
    K/2 >= 16 dot per nibble)."""
    for T in (1, 16, 64, 256, 1024, 16384):
        for N, K in ((4096, 2048), (2048, 2048), (256, G), (40, 4 * G)):
            cfg = default_config(T, 8, N, K, INT4, (1, G), top_k=2)
            bf16 = default_config(T, 8, N, K, NONE, top_k=2)
            assert (G % cfg.block_k == 0 or cfg.block_k % G == 0) and cfg.block_k >= 32, (T, N, K, cfg)
            if T * 2 / 8 <= 64:  # 32 columns where 128 would give < 384 programs (configs.PACKED_DECODE_PROGRAMS)
                cap = 32 if min(8, 2 * T) * -(-N // 128) < 384 else 128
                want = TileConfig(16, min(cap, max(16, 1 << (N - 1).bit_length())), min(128, max(K, 32)),
                                  16 if T * 2 / 8 > 16 else 1, 4, 4)
                assert cfg == want, (T, N, K, cfg)
            else:  # prefill: the 16-bit BLOCK_M and GROUP_M, 128 x 64 tiles and 8 warps (no spills)
                want = TileConfig(bf16.block_m, min(128, max(16, 1 << (N - 1).bit_length())), max(32, min(64, K)),
                                  bf16.group_m, 8, 4)
                assert cfg == want, (T, N, K, cfg)
    assert default_config(1, 8, 4096, 2048, INT4, None, top_k=2) == TileConfig(16, 32, 128, 1, 4, 4)  # [1, 128]
    assert default_config(1, 8, 28672, 4096, INT4, None, top_k=2).block_n == 128  # Mixtral GEMM1: 448 programs


def test_4bit_decode_tiles_narrow_where_128_columns_leave_few_programs():
    """H100, session 15 (docs/kernels.md): 16 x 32 tiles on the four cells timed at T = 1 (Qwen3-30B-A3B and
    GPT-OSS-20B, both GEMMs: 92-180 programs at 128 columns); batched decode keeps 128 (Qwen3 T = 16: 1536)."""
    mx = QUANT_SCHEMES["mxfp4"]
    for sc, block in ((INT4, (1, 128)), (mx, (1, 32))):
        assert default_config(1, 128, 1536, 2048, sc, block, top_k=8).block_n == 32
        assert default_config(1, 128, 2048, 768, sc, block, top_k=8).block_n == 32
        assert default_config(16, 128, 1536, 2048, sc, block, top_k=8).block_n == 128
    assert default_config(1, 32, 5760, 2880, INT4, (1, 64), top_k=4) == TileConfig(16, 32, 64, 1, 4, 4)
    assert default_config(1, 32, 2880, 2880, mx, (1, 32), top_k=4) == TileConfig(16, 32, 64, 1, 4, 4)
    assert default_config(16, 32, 5760, 2880, mx, (1, 32), top_k=4).block_n == 128


def test_mxfp4_decode_tiles_span_several_groups():
    """mxfp4's G = 32: decode takes BLOCK_K = 128 (four groups a K step, scaled before the dot), halved down to
    64 while it leaves a K tail (GPT-OSS's K = 2880: 64), never below 64 for that (K = 2080 keeps 128)."""
    mx = QUANT_SCHEMES["mxfp4"]
    assert default_config(1, 128, 1536, 2048, mx, (1, 32), top_k=8) == TileConfig(16, 32, 128, 1, 4, 4)
    assert default_config(1, 32, 5760, 2880, mx, (1, 32), top_k=4) == TileConfig(16, 32, 64, 1, 4, 4)
    assert default_config(1, 32, 5760, 2080, mx, (1, 32), top_k=4).block_k == 128
    assert default_config(1, 32, 64, 32, mx, (1, 32), top_k=4).block_k == 32


def test_int4_interpreter_tiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for G in (32, 64, 128):
        cfg = get_config(33, 4, 64, 64, INT4, (1, G), torch.device("cpu"), top_k=2)
        assert G % cfg.block_k == 0 and cfg.block_k == 32 and cfg.block_m == 16


def test_int4_tuned_entry_read_by_its_key_and_unusable_block_k_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(configs, "device_name", lambda index: "Fake GPU")
    monkeypatch.setenv(configs.TUNED_DIR_ENV, str(tmp_path))
    good, bad = TileConfig(16, 128, 64, 1, 4, 4), TileConfig(16, 128, 96, 1, 4, 4)
    _write_table(tmp_path, "Fake GPU", [
        {"E": 8, "N": 1024, "K": 512, "scheme": "int4_w4a16_1x32", "configs": {"16": good.to_dict()}},
        {"E": 8, "N": 1024, "K": 256, "scheme": "int4_w4a16_1x64", "configs": {"16": bad.to_dict()}},
    ])
    assert get_config(3, 8, 1024, 512, INT4, (1, 32), CUDA0, top_k=2) == good
    # another group size is another key: heuristic
    assert get_config(3, 8, 1024, 512, INT4, (1, 64), CUDA0, top_k=2) == default_config(3, 8, 1024, 512, INT4, (1, 64),
                                                                                        top_k=2)
    # BLOCK_K = 96 neither divides G = 64 nor is a multiple of it: falls back to the heuristic
    got = get_config(3, 8, 1024, 256, INT4, (1, 64), CUDA0, top_k=2)
    assert got == default_config(3, 8, 1024, 256, INT4, (1, 64), top_k=2) and got.block_k == 128



# ------------------------------------------------------------------------------------------ batch invariance
#: (E, top_k, H, I, gated) of the benchmark models: the packaged H100 table covers some, the heuristic the rest
_MODELS = {"qwen3": (128, 8, 2048, 768, True), "mixtral": (8, 2, 4096, 14336, True),
           "gpt-oss": (32, 4, 2880, 2880, True), "deepseek": (256, 8, 7168, 2048, True), "odd": (6, 2, 160, 96, False)}


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "Unknown GPU"])
@pytest.mark.parametrize("model", list(_MODELS))
@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES.values()), ids=list(QUANT_SCHEMES))
def test_invariant_tiles_share_one_reduction_signature(scheme, model, device, monkeypatch):
    """docs/batch-invariance.md: for each GEMM, every T bucket's invariant tiles have the K step of the largest
    bucket and a wgmma-sized BLOCK_M, fit the shared-memory budget and the scheme; the largest bucket's tiles
    are the default ones whenever those already qualify (prefill pays nothing). Unquantized 16-bit experts keep
    the default tiles at every T."""
    monkeypatch.delenv(configs.TUNED_DIR_ENV, raising=False)
    E, k, H, I, gated = _MODELS[model]
    block = scheme.block_shape(None) if scheme.tiled else None
    family = None if device == "Unknown GPU" else "sm90"
    for N, K in (((2 if gated else 1) * I, H), (H, I)):
        for a_bytes in ((1,) if scheme.fp8_dot else (2, 4)):
            def cfg(T, invariant):
                return configs._cuda_config(configs.token_bucket(T), E, N, K, scheme, block, k, device, family, None,
                                            invariant, a_bytes)
            buckets = (*configs.TOKEN_BUCKETS, configs.BEYOND)
            got = [cfg(T, True) for T in buckets]
            if configs.plain_dot(scheme, a_bytes):  # any tiles give the same bits: the default ones
                assert got == [cfg(T, False) for T in buckets]
                continue
            assert len({configs.reduction_signature(c, scheme, a_bytes) for c in got}) == 1, got
            for c in got:
                assert c.block_m >= configs.INVARIANT_MIN_BLOCK_M and configs._usable(c, scheme, block)
                assert configs.smem_bytes(c, scheme, a_bytes) <= configs.SMEM_BUDGET, c
            big = cfg(configs.BEYOND, False)
            if big.block_m >= configs.INVARIANT_MIN_BLOCK_M and \
                    configs.smem_bytes(big, scheme, a_bytes) <= configs.SMEM_BUDGET:
                assert got[-1] == big


@pytest.mark.parametrize("model", list(_MODELS))
@pytest.mark.parametrize("scheme", [s for s in QUANT_SCHEMES.values() if s.flags.W_CAST], ids=lambda s: s.name)
def test_swapped_invariant_tiles_widen_the_weight_rows_not_the_token_rows(scheme, model, monkeypatch):
    """TORCH_MOE_OPS_SWAP_AB=1 (docs/kernels.md): the weights' rows are the MMA's M, so the mode's invariant tiles
    take BLOCK_N >= 64 and the largest bucket's K step, and keep each bucket's BLOCK_M (decode keeps 16-row
    token tiles); one reduction signature per GEMM; fp32 activations do not swap."""
    from torch_moe_ops._platform import SWAP_AB_ENV

    monkeypatch.delenv(configs.TUNED_DIR_ENV, raising=False)
    monkeypatch.setenv(SWAP_AB_ENV, "1")
    E, k, H, I, gated = _MODELS[model]
    block = scheme.block_shape(None) if scheme.tiled else None
    assert configs.swaps(scheme, 2) and not configs.swaps(scheme, 4)
    for N, K in (((2 if gated else 1) * I, H), (H, I)):
        def cfg(T, invariant):
            return configs._cuda_config(configs.token_bucket(T), E, N, K, scheme, block, k, "NVIDIA H100 80GB HBM3",
                                        "sm90", None, invariant, 2, None, None, invariant)
        buckets = (*configs.TOKEN_BUCKETS, configs.BEYOND)
        got = [cfg(T, True) for T in buckets]
        assert len({configs.reduction_signature(c, scheme, 2, swapped=True) for c in got}) == 1, got
        assert len({configs.joins_k(scheme, c, 2, True) for c in got}) == 1, got  # mxfp4's K order too
        for c, T in zip(got, buckets):
            assert c.block_n >= configs.INVARIANT_MIN_BLOCK_M and c.num_warps % 4 == 0, c
            assert c.block_m == configs.fit_smem(cfg(T, False), scheme).block_m  # the bucket's token rows
            assert configs.smem_bytes(c, scheme, 2) <= configs.SMEM_BUDGET, c


def test_fit_smem_keeps_a_swapped_mma_m():
    """Under swapped operands BLOCK_N is the MMA's M: shared memory is never fitted by narrowing it below a
    wgmma's 64 rows (nor by touching BLOCK_M, which GEMM2 shares with GEMM1)."""
    big = TileConfig(128, 256, 128, 1, 8, 4)
    fitted = configs.fit_smem(big, INT4, 2, budget=40 * 1024, swapped=True)
    assert fitted.block_n == configs.INVARIANT_MIN_BLOCK_M and fitted.block_m == 128 and fitted.num_stages == 2
    assert configs.fit_smem(big, INT4, 2, budget=40 * 1024).block_n == 32


def test_invariant_config_pins_the_anchor_and_fits_shared_memory():
    decode, prefill = TileConfig(16, 256, 128, 1, 4, 4), TileConfig(128, 256, 64, 16, 8, 4)
    got = configs.invariant_config(decode, prefill, NONE, a_bytes=4)  # fp32: not a plain 16-bit dot
    assert (got.block_m, got.block_k) == (64, 64) and configs.reduction_signature(got, NONE, 4) == (64, True)
    assert configs.smem_bytes(got, NONE, 4) <= configs.SMEM_BUDGET
    assert configs.invariant_config(decode, prefill, NONE, a_bytes=2) == configs.fit_smem(decode, NONE, 2)  # any tiles
    assert configs.reduction_signature(decode, NONE, 2) == configs.reduction_signature(prefill, NONE, 2) == ()
    wide = configs.invariant_config(TileConfig(16, 256, 256, 1, 4, 5), TileConfig(128, 256, 256, 1, 8, 4), NONE, 4)
    assert wide.num_stages == 2 and wide.block_n < 256 and configs.smem_bytes(wide, NONE, 4) <= configs.SMEM_BUDGET
    assert configs.smem_bytes(TileConfig(64, 128, 128, 1, 4, 3), INT4, 2) == 3 * (64 * 128 * 2 + 64 * 128)
    # a (user-tuned) 2-warp config: whole warpgroups, or Triton would not use wgmma
    assert configs.invariant_config(TileConfig(16, 64, 64, 1, 2, 3), prefill, NONE, 4).num_warps == 4


def test_cpu_configs_do_not_depend_on_the_mode():
    """Interpreter tiles are one config for every T already: the mode changes nothing there."""
    for T in (1, 5000):
        assert get_config(T, 4, 48, 40, INT4, (1, 32), torch.device("cpu"), top_k=2, invariant=True) == \
            get_config(1, 4, 48, 40, INT4, (1, 32), torch.device("cpu"), top_k=2)


def test_tiles_fit_the_gpus_shared_memory():
    """A GPU with less shared memory than an H100 (an RTX 4090 opts into 99 KB a block) gets tiles that fit it,
    tuned or heuristic, in both modes; the K step is kept."""
    small = 99 * 1024
    for T in (1, 64, 4096, 16384):
        for invariant in (False, True):
            for scheme, a in ((NONE, 2), (NONE, 4), (FP8_BLOCK, 1), (INT4, 2)):
                block = scheme.block_shape(None) if scheme.tiled else None
                cfg = configs._cuda_config(configs.token_bucket(T), 128, 1536, 2048, scheme, block, 8,
                                           "NVIDIA H100 80GB HBM3", "sm90", None, invariant, a, small)
                roomy = configs._cuda_config(configs.token_bucket(T), 128, 1536, 2048, scheme, block, 8,
                                             "NVIDIA H100 80GB HBM3", "sm90", None, invariant, a, None)
                assert configs.smem_bytes(cfg, scheme, a) <= small and cfg.block_k == roomy.block_k, (T, cfg)


def test_device_smem_falls_back_without_a_gpu():
    configs.device_smem.cache_clear()
    assert configs.device_smem(0) == configs.SMEM_BUDGET or torch.cuda.is_available()


def test_int4_prefill_tiles_swap_by_default_and_nothing_else(monkeypatch):
    """configs.swaps without the switch (docs/kernels.md, "Swapped operands": measured on an H100): int4's 16-bit
    GEMMs on tiles of BLOCK_M >= 64, not in the batch-invariant mode (its arithmetic may not change with T), not
    at decode tiles, not for the other converted weights; the switch swaps all of them, invariant mode included."""
    from torch_moe_ops._platform import SWAP_AB_ENV

    monkeypatch.delenv(SWAP_AB_ENV, raising=False)
    int4, int8, mxfp4 = (QUANT_SCHEMES[n] for n in ("int4_w4a16", "int8_w8a16", "mxfp4"))
    assert configs.swaps(int4, 2, 128) and configs.swaps(int4, 2, 64)
    assert not configs.swaps(int4, 2, 32) and not configs.swaps(int4, 4, 128)
    assert not configs.swaps(int4, 2, 128, invariant=True)
    assert not configs.swaps(int8, 2, 128) and not configs.swaps(mxfp4, 2, 128)
    assert not any(configs.swaps(s, 2, 128) for s in QUANT_SCHEMES.values() if not s.flags.W_CAST)
    monkeypatch.setenv(SWAP_AB_ENV, "1")
    assert configs.swaps(int4, 2, 16, invariant=True) and configs.swaps(int8, 2, 16) and configs.swaps(mxfp4, 2, 16)


def test_tile_config_parses_its_spelling():
    """``TileConfig.parse``: the benchmarks' and tools' "BMxBNxBK[xWARPSxSTAGES]"; anything else is refused."""
    assert TileConfig.parse("16x32x128") == TileConfig(16, 32, 128, 1, 4, 4)
    assert TileConfig.parse("64x128x64x8x3") == TileConfig(64, 128, 64, 1, 8, 3)
    for bad in ("16x32", "16x32x128x4", "16xAx128", ""):
        with pytest.raises(ValueError, match="BMxBNxBK"):
            TileConfig.parse(bad)
