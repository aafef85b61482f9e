"""benchmarks/run.py and benchmarks/shapes.py pieces that run without a GPU: the roofline's weight bytes per
format (mxfp4's one-byte scales) and the L2-defeating weight copies (how many, what they replace)."""
from types import SimpleNamespace

import torch

from benchmarks import run, shapes
from benchmarks.shapes import SHAPES, expert_bytes
from torch_moe_ops.schemes import QUANT_SCHEMES
from torch_moe_ops.testing import experts_kwargs


def test_every_shape_benchmarks_every_scheme():
    for shape in SHAPES.values():
        assert set(shape.schemes) == set(QUANT_SCHEMES), shape.name


def test_expert_bytes_per_format():
    oss = SHAPES["gpt-oss-20b"]  # w13 [5760, 2880], w2 [2880, 2880]
    weights = 5760 * 2880 + 2880 * 2880
    assert expert_bytes(oss, "none") == 2 * weights
    assert expert_bytes(oss, "mxfp4") == weights // 2 + weights // 32  # E8M0: one byte per 32 weights
    assert expert_bytes(oss, "int8_w8a16") == weights + 4 * (5760 + 2880)  # fp32 per-channel scales


def _data(scheme="int4_w4a16", E=4, N=64, K=64):
    q13 = torch.randint(0, 255, (E, N, K // 2), dtype=torch.uint8)
    s13 = torch.rand(E, N, K // 32)
    q2, s2 = q13.clone(), s13.clone()
    return SimpleNamespace(w13=None, w2=None, b13=None, b2=None, q13=q13, q2=q2, s13=s13, s2=s2, block=(1, 32),
                           quant=experts_kwargs(scheme, s13, s2, (1, 32)), qscheme=QUANT_SCHEMES[scheme])


def test_l2_copies_rotate_every_tensor_and_the_scales_in_quant(monkeypatch):
    data = _data()
    full = sum(t.numel() * t.element_size() for t in (data.q13, data.q2, data.s13, data.s2))
    monkeypatch.setattr(shapes, "L2_DEFEAT_BYTES", 10 * full)
    rotations = []
    assert run.l2_copies(full / 2, data, rotations) == 20 and len(rotations) == 19
    r = rotations[3]
    for name in ("q13", "q2", "s13", "s2"):
        got, orig = getattr(r, name), getattr(data, name)
        assert torch.equal(got, orig) and got.data_ptr() != orig.data_ptr(), name
    assert r.quant["w13_scale"] is r.s13 and r.quant["w2_scale"] is r.s2 and r.quant["block_shape"] == [1, 32]
    # a later, larger cell reuses the copies; touched bytes past the threshold take the original alone
    assert run.l2_copies(full, data, rotations) == 10 and len(rotations) == 19
    assert run.l2_copies(20 * full, data, rotations) == 1
    monkeypatch.setattr(run, "COPIES_MAX_BYTES", 3 * full)  # the memory cap wins
    assert run.l2_copies(1, data, rotations) == 3


def test_tune_candidates_span_groups_and_fit_shared_memory():
    from benchmarks import tune

    mx = QUANT_SCHEMES["mxfp4"]
    cands, default = tune.candidates(1, 4, 32, 5760, 2880, mx, (1, 32), "quick")
    # one group a K step, or several (not 32: two 16-deep dots); decode tiles down to 16 columns
    assert {c.block_k for c in cands} == {64, 128, 256} and default in cands
    assert {c.block_n for c in cands} == {16, 32, 64, 128}
    small, _ = tune.candidates(1, 4, 32, 5760, 2880, mx, (1, 32), "quick", smem=16 * 1024)
    assert small and all((c.block_m * c.block_k * 2 + c.block_k * c.block_n / 2) * c.num_stages <= 16 * 1024
                         for c in small if c != default)


def test_tune_keeps_only_tiles_that_agree_with_the_default():
    """A candidate whose output differs from the default tiles' is never kept (tune.agrees)."""
    import torch

    from benchmarks import tune

    class Problem:  # a GEMM that writes every row but row 3, and miscomputes with the "bad" tile
        c = torch.zeros(8, 4)

        def run(self, cfg):
            self.c[:3] = 1.0
            self.c[4:] = 1.0 + (0.5 if cfg == "bad" else 1e-4 if cfg == "close" else 0.0)

    assert tune.agrees(Problem(), "close", "default") and not tune.agrees(Problem(), "bad", "default")


def test_tune_takes_t1_on_the_real_call_and_the_rest_gemm_by_gemm(monkeypatch, tmp_path):
    """--model with T = 1: tune_t1 (fused_moe of one token, both GEMMs' candidates at BLOCK_M 16), and each GEMM
    alone at the other T; --aligned-t1 keeps T = 1 GEMM by GEMM."""
    from benchmarks import tune

    shape, (c1, d1), (c2, d2) = tune.t1_candidates("gpt-oss-20b", QUANT_SCHEMES["int4_w4a16"], (1, 64), "quick",
                                                   227 * 1024)
    assert (shape.n1, shape.H, shape.I, shape.activation) == (5760, 2880, 2880, "swigluoai")
    assert d1 in c1 and d2 in c2 and {c.block_m for c in c1 + c2} == {16}
    assert tune.t1_candidates("qwen3-30b-a3b", QUANT_SCHEMES["none"], None, "quick", 227 * 1024, tp=2)[0].I == 384
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU X")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(
        shared_memory_per_block_optin=227 * 1024, major=9, minor=0))
    calls = []
    monkeypatch.setattr(tune, "tune_t1", lambda args, model, *a: calls.append(("t1", model)) or True)
    monkeypatch.setattr(tune, "tune_layer", lambda args, scheme, block, gemms, *a, skip_t1=False: calls.append(
        ("gemms", [g[0] for g in gemms], skip_t1)))
    base = ["--model", "qwen3-30b-a3b", "--peak-tflops", "1", "--bandwidth", "1", "--out", str(tmp_path / "t.json")]
    tune.main(base + ["--T", "1", "16"])
    assert calls == [("t1", "qwen3-30b-a3b"), ("gemms", ["gemm1", "gemm2"], True)]
    calls.clear()
    tune.main(base + ["--T", "1", "--aligned-t1"])
    assert calls == [("gemms", ["gemm1", "gemm2"], False)]
    calls.clear()  # a scale tile the benchmark's weights do not take: T = 1 GEMM by GEMM after all
    monkeypatch.setattr(tune, "tune_t1", lambda args, model, *a: calls.append(("t1", model)) and False)
    tune.main(base + ["--T", "1"])
    assert calls == [("t1", "qwen3-30b-a3b"), ("gemms", ["gemm1", "gemm2"], False)]


def test_load_peak_pipeline_on_cpu(tmp_path, capsys):
    """benchmarks/load_peak.py end to end at a CPU size: the Hub's GPT-OSS MXFP4 layout, loaded packed."""
    import json

    import pytest

    pytest.importorskip("transformers")
    from benchmarks import load_peak

    assert load_peak.main(["--layers", "3", "--small", "--device", "cpu", "--dir", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "r.json")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["quant_scheme"] == "mxfp4" and row["file_bytes"] > row["expert_bytes"] > 0
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.experts.down_proj_scales" in index["weight_map"]


def test_invariance_table_runs_on_cpu(tmp_path, capsys):
    """benchmarks.invariance on the CPU reference with small dims: both modes per scheme; the mode's rows agree."""
    import json

    from benchmarks import invariance

    out = tmp_path / "inv.json"
    invariance.main(["--device", "cpu", "--dims", "6,2,64,32", "--T", "24", "--sizes", "1,5",
                     "--schemes", "none,fp8_block", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["scheme"], r["invariant"]) for r in rows] == [("none", False), ("none", True), ("fp8_block", False),
                                                            ("fp8_block", True)]
    assert all(sum(r["differing"].values()) == 0 for r in rows if r["invariant"])
    out = capsys.readouterr().out
    assert "fp8_block   invariant" in out and "| fp8_block | invariant | 0/" in out


def test_train_benchmark_providers_compute_the_same_step():
    """benchmarks.train on CPU: each provider's forward is ours' forward (the grouped_mm pipeline too), its
    gradients match, and the runner writes a cell per provider."""
    import dataclasses
    import json
    import tempfile

    import torch_moe_ops
    from benchmarks import train

    shape = dataclasses.replace(SHAPES["qwen3-30b-a3b"], E=6, k=2, H=64, I=32)
    w13, w2 = torch.randn(6, 64, 64).bfloat16() / 8, torch.randn(6, 64, 32).bfloat16() / 8
    x = torch.randn(19, 64).bfloat16()
    w, ids = torch_moe_ops.topk_route(torch.randn(19, 6), 2)
    provs, leaves = train.providers(shape, w13, w2, x, w, ids)
    want = provs["ours"][0]()
    grads = {}
    for name in ("ours", "ours_saved", "grouped_mm"):
        if name not in provs:
            continue
        out = provs[name][0]()
        torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
        train.step(provs[name][0], leaves, torch.ones_like(x))()
        grads[name] = [t.grad.float().clone() for t in leaves]
    for name, g in grads.items():
        for a, b in zip(g, grads["ours"]):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2, msg=name)
    with tempfile.TemporaryDirectory() as d:
        train.main(["--device", "cpu", "--dims", "6,2,64,32", "--tokens", "9", "--shapes", "qwen3-30b-a3b",
                    "--out", f"{d}/t.json"])
        cells = json.load(open(f"{d}/t.json"))["cells"]
    assert {c["provider"] for c in cells} >= {"ours", "ours_saved", "ours_fp8_frozen"}
    assert all("ms" in c for c in cells), cells


def test_swapped_provider_sets_its_switch_for_its_own_call_only(monkeypatch):
    """``ours_swapped``: converted-weight schemes only; the switch is on during its call and plans are cleared
    around it (a plan recorded under one setting is never replayed under the other), then both are as before."""
    import os

    import torch_moe_ops as moe
    from benchmarks.providers import REGISTRY
    from torch_moe_ops._platform import SWAP_AB_ENV, swap_ab

    build = REGISTRY["ours_swapped"].build
    assert build(SimpleNamespace(qscheme=QUANT_SCHEMES["fp8_block"])) is None
    seen, cleared = [], []
    monkeypatch.delenv(SWAP_AB_ENV, raising=False)
    monkeypatch.setattr(moe, "fused_experts", lambda *a, **k: seen.append(swap_ab()) or "out")
    monkeypatch.setattr(moe, "clear_launch_plans", lambda: cleared.append(swap_ab()))
    case = SimpleNamespace(shape=SimpleNamespace(activation="silu"), x=None, topk_weights=None, topk_ids=None,
                           **vars(_data()))
    assert build(case)() == "out"
    assert seen == [True] and cleared == [False, False] and SWAP_AB_ENV not in os.environ
    monkeypatch.setenv(SWAP_AB_ENV, "on")  # a run started with the switch keeps it for the other providers
    assert build(case)() == "out" and os.environ[SWAP_AB_ENV] == "on"
