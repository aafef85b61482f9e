"""benchmarks/host.py, benchmarks/e2e.py and benchmarks/report_host.py on CPU: the ``--smoke`` runs finish and
write JSON with the documented keys, the report renders them and rewrites only its section of
docs/performance.md; the pieces that decide what is timed (profiler event selection, budget, merging of
follow-up runs, the results folder's GPU name) on synthetic input.

Each smoke run happens in one test (not a module fixture): under pytest-xdist a module fixture would run
once per worker."""
import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import e2e, host, report_host
from benchmarks.env import gpu_short_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_host_smoke_rows_keys_and_report(tmp_path):
    assert host.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = _load(tmp_path / "host.json")
    assert result["smoke"] and result["env"]["device"] == "cpu" and result["method"]["calls"] == 3
    ops = [r for r in result["rows"] if "op" in r]
    stack = [r for r in result["rows"] if "stack" in r]
    assert [r for r in result["rows"] if "error" in r] == []
    # every op x scheme x T of the one smoke shape
    assert sorted({(r["op"], r["scheme"], r["T"]) for r in ops}) == sorted(
        (op, s, T) for op in host.OPS for s in host.SCHEMES for T in host.SMOKE_TOKENS)
    for r in ops:
        assert set(host.HOST_KEYS) <= set(r) and r["shape"] == "Tiny-MoE"
        assert r["host_us_eager"] > 0 and r["host_us_compiled"] > 0 and r["graph_us"] is None  # no CUDA graph on CPU
        assert r["frames"] == 1 and r["recompiles"] == 0  # one graph per cell, none during the timed calls
    assert sorted((r["scheme"], r["T"]) for r in stack) == sorted(
        (s, T) for s in host.STACK_SCHEMES for T in host.SMOKE_TOKENS)
    for r in stack:
        assert set(host.STACK_KEYS) <= set(r) and r["stack"] == "tiny-4layer" and r["layers"] == 4
        assert r["marginal_us_compiled"] == pytest.approx(
            (r["compiled_host_ms"] - r["nomoe_compiled_host_ms"]) * 1e3 / 4)
        assert r["frames"] == 1 and r["nomoe_frames"] == 1 and r["recompiles"] == 0
    env = (tmp_path / "env.txt").read_text()
    assert "device: cpu" in env and "torch: " in env and "transformers: " in env and "date: " in env

    text = report_host.section(str(tmp_path), result, [], REPO)
    assert text.startswith(report_host.SECTION) and report_host.BEGIN in text
    assert text.rstrip().endswith(report_host.END)
    assert "| `fused_moe` | Tiny-MoE | bf16 |" in text and "| fp8_block | 4 |" in text


def test_e2e_smoke_rows_keys_split_and_report(tmp_path):
    # every kind of impl (ours bf16, ours quantized, transformers' two); fp8 / int8 take ours_int4's path
    impls = ["ours_none", "ours_int4_w4a16", "hf_grouped_mm", "hf_eager"]
    assert e2e.main(["--smoke", "--out", str(tmp_path), "--impls", ",".join(impls)]) == 0
    result = _load(tmp_path / "e2e.json")
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    assert sorted((r["impl"], r["mode"], r["batch"]) for r in rows) == sorted(
        (i, m, b) for i in impls for m in e2e.DEFAULT_MODES for b in (1, 2))
    assert len({r["weights_sum"] for r in rows}) == 1  # the same weights for every impl
    for r in rows:
        assert set(e2e.ROW_KEYS) <= set(r) and r["layers"] == 2 and r["tok_s"] > 0
        assert r["step_ms"] == pytest.approx(r["batch"] / r["tok_s"] * 1e3)
        assert r["moe_kernel_ms"] is None and r["moe_graph_ms"] is None  # no CUDA
        if r["mode"] == "compiled":
            assert r["compile_s"] > 0 and r["recompiles"] == 0
            assert r["frames"] == 1 or r["impl"] == "hf_eager"  # its data-dependent loop breaks the graph
        if r["mode"] == "eager" or r["impl"].startswith("ours_"):
            # every decode step's MoE parts were found: 2 steps after the prefill's token, 2 layers each
            assert r["profiled_steps"] >= 2 and r["profiled_steps"] == int(r["profiled_steps"]) and r["moe_ms"] > 0
        else:
            assert r["moe_ms"] is None and "moe_note" in r
    assert result["method"]["transformers"] and (tmp_path / "env.txt").exists()

    text = report_host.section(str(tmp_path), None, [result], REPO)
    assert "| ours_int4_w4a16 |" in text and "batch 2 compiled tok/s" in text


def test_e2e_graphs_mode_is_transformers_reduce_overhead(tmp_path, monkeypatch):
    """--modes graphs: CompileConfig(mode="reduce-overhead") (CUDA graphs on a GPU; Inductor skips them on CPU),
    no per-op host split, and a report column of its own."""
    from transformers import CompileConfig

    seen = []
    real = CompileConfig.__init__
    monkeypatch.setattr(CompileConfig, "__init__", lambda self, *a, **k: seen.append(k.get("mode"))
                        or real(self, *a, **k))
    assert e2e.main(["--smoke", "--out", str(tmp_path), "--impls", "ours_none", "--batch", "1",
                     "--modes", "graphs"]) == 0
    (row,) = _load(tmp_path / "e2e.json")["rows"]
    assert "error" not in row and row["mode"] == "graphs" and row["tok_s"] > 0 and row["moe_ms"] is None
    assert "reduce-overhead" in row["moe_note"] and seen and set(seen) == {"reduce-overhead"}
    text = report_host.section(str(tmp_path), None, [_load(tmp_path / "e2e.json")], REPO)
    assert "batch 1 graphs tok/s" in text and "reduce-overhead" in text


def test_budget_skips_rows_without_building(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "build", lambda *a, **k: pytest.fail("built a model past the budget"))
    assert e2e.main(["--smoke", "--out", str(tmp_path), "--impls", "ours_none", "--batch", "1",
                     "--budget-s", "0.001"]) == 0
    rows = _load(tmp_path / "e2e.json")["rows"]
    assert [(r["mode"], r["error"].split(":")[0]) for r in rows] == [("eager", "skipped"), ("compiled", "skipped")]


def test_a_failing_impl_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    real = e2e.build

    def build(impl, *a, **k):
        if impl == "ours_fp8_block":
            raise RuntimeError("boom")
        return real(impl, *a, **k)

    monkeypatch.setattr(e2e, "build", build)
    assert e2e.main(["--smoke", "--out", str(tmp_path), "--impls", "ours_fp8_block,ours_none", "--batch", "1",
                     "--modes", "eager", "--name", "e2e-x.json"]) == 0
    rows = _load(tmp_path / "e2e-x.json")["rows"]
    assert "boom" in rows[0]["error"] and rows[1]["impl"] == "ours_none" and rows[1]["tok_s"] > 0
    assert (tmp_path / "env-e2e-x.txt").exists()  # a follow-up run names its own env file


def test_quick_and_smoke_defaults():
    q = e2e.parse_args(["--out", "x", "--quick"])
    assert (q.impls, q.batch, q.layers, q.device, q.budget_s) == (list(e2e.QUICK_IMPLS), [1], 24, "cuda", 480.0)
    s = e2e.parse_args(["--out", "x", "--smoke"])
    assert (s.layers, s.device, s.backend, s.budget_s, s.new_tokens) == (2, "cpu", "aot_eager", None, 4)
    d = e2e.parse_args(["--out", "x"])
    assert (d.impls, d.batch, d.modes, d.prompt, d.new_tokens) == (list(e2e.IMPLS), [1, 8], list(e2e.DEFAULT_MODES), 128,
                                                                    64)
    with pytest.raises(SystemExit):
        e2e.parse_args(["--out", "x", "--impls", "ours_fp8"])
    h = host.parse_args(["--out", "x", "--only", "stack"])
    assert (h.tokens, h.calls, h.repeats, h.device, h.backend) == ([1, 256], 20, 10, "cuda", "inductor")


def _event(name, start, end, parent=None, shapes=(), cpu=0.0, dev=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=list(shapes), cpu_time_total=cpu,
                           device_time_total=dev, start=start, end=end)


def test_decode_events_pick_decode_steps_and_outermost_ops():
    outer = _event("moe::fused_moe", 0, 10, shapes=[[2, 64], [2, 8]])
    inner = _event("moe::topk_route", 1, 2, parent=outer, shapes=[[2, 8]])
    prefill = _event("moe::fused_moe", 20, 40, shapes=[[16, 64], [16, 8]])
    other = _event("aten::mm", 50, 60, shapes=[[2, 64]])
    found = e2e.decode_events([outer, inner, prefill, other], batch=2, eager=False)
    assert found == [outer]  # the prefill (16 rows) and the nested op are left out
    blocks = [_event("moe_block[T=2]", 0, 1), _event("moe_block[T=16]", 2, 3), _event("moe_block[T=2]", 4, 5)]
    assert e2e.decode_events(blocks, batch=2, eager=True) == [blocks[0], blocks[2]]


def test_merge_keeps_measured_rows_over_skipped_ones():
    base = dict(impl="ours_none", mode="compiled", batch=8, layers=24)
    first = {"env": {"time": "2026-12-07 10:00 UTC"}, "rows": [dict(base, error="skipped: time budget")]}
    second = {"env": {"time": "2026-12-07 10:20 UTC"}, "rows": [dict(base, tok_s=50.0)]}
    third = {"env": {"time": "2026-12-07 10:40 UTC"}, "rows": [dict(base, error="skipped: time budget")]}
    for order in ([first, second, third], [third, second, first]):
        _, rows = report_host.merge_e2e(order)
        assert rows == [dict(base, tok_s=50.0)]


def test_update_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "performance.md"
    shutil.copy(os.path.join(REPO, "docs", "performance.md"), doc)
    before = doc.read_text()
    assert report_host.BEGIN in before  # the placeholder section is in the page
    report_host.update_doc(str(doc), report_host.SECTION + "\n\n" + report_host.BEGIN + "\n\nnew\n\n" + report_host.END)
    after = doc.read_text()
    head = before[:before.index(report_host.SECTION)]
    assert after.startswith(head) and "\n\nnew\n\n" in after and after.count(report_host.SECTION) == 1
    report_host.update_doc(str(doc), report_host.placeholder())
    assert doc.read_text().startswith(head) and doc.read_text().count(report_host.BEGIN) == 1


def test_gpu_short_names():
    assert gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_short_name("NVIDIA H200") == "h200"
    assert gpu_short_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_short_name("cpu") == "cpu"


def test_enqueue_time_stops_the_clock_before_synchronizing(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(host.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(host, "_sync", lambda device: clock.__setitem__(0, clock[0] + 100.0))  # a slow GPU

    def call():
        clock[0] += 1e-6

    assert host.enqueue_us(call, calls=4, repeats=3, device=torch.device("cpu")) == pytest.approx(1.0)
    assert host.wall_us(call, calls=4, repeats=3, device=torch.device("cpu")) > 1e6  # waits for the GPU


def test_host_profile_smoke_runs_the_dispatcher_floors(tmp_path):
    from benchmarks import host_profile

    argv = sys.argv
    sys.argv = ["host_profile", "--smoke", "--out", str(tmp_path)]
    try:
        host_profile.main()
    finally:
        sys.argv = argv
    rows = json.loads((tmp_path / "host_profile.json").read_text())
    assert rows[-1]["floors"] == "cpu" and rows[-1]["custom_op_us"] > 0 and rows[-1]["library_us"] > 0  # last
    timed = {"compiled_public_schema_op_us", "compiled_twin_schema_op_us", "layer_python_us", "hf_block_python_us"}
    assert timed <= set(rows[-1])
    (compiled,) = rows[:-1]  # the compiled split's code path, on a small CPU layer
    assert "error" not in compiled and compiled["compiled_us"] > 0 and compiled["compiled_x2_us"] > 0
    assert "function calls" in compiled["cprofile_top"]  # pstats header: the profile ran
    assert (tmp_path / "compiled_plans_none_T3.py").read_text()  # Inductor's generated code


def test_kernel_split_smoke_profiles_each_cell(tmp_path):
    """benchmarks.kernel_split on CPU: one row per (scheme, T), each with its per-op split and their sum."""
    from benchmarks import kernel_split

    assert kernel_split.main(["--smoke", "--out", str(tmp_path), "--schemes", "none,fp8_block", "--tokens", "1,3"]) == 0
    rows = json.loads((tmp_path / "kernel_split.json").read_text())["rows"]
    assert [(r["scheme"], r["T"]) for r in rows] == [("none", 1), ("none", 3), ("fp8_block", 1), ("fp8_block", 3)]
    assert all(r["kernels"] and r["kernels_us"] == pytest.approx(sum(k["us"] for k in r["kernels"].values()))
               for r in rows)
    # an op run n > 1 times a call is also split launch by launch, the parts adding up to its total
    split = [k for r in rows for k in r["kernels"].values() if k["launches"] > 1]
    assert split and all(k["us"] == pytest.approx(sum(k["per_launch_us"])) and len(k["per_launch_us"]) ==
                         k["launches"] for k in split)


def test_kernel_split_tile_variants_become_tables_the_lookup_reads(tmp_path):
    """--tiles: each variant's folder holds a table of the GPU giving GEMM1 [E, n1, H] and GEMM2 [E, H, I] their
    tiles at T's bucket, under the scheme's table key, which the config lookup then returns."""
    from benchmarks import kernel_split
    from benchmarks.shapes import SHAPES
    from torch_moe_ops._kernels import configs
    from torch_moe_ops.schemes import get_quant_scheme

    shape, sc = SHAPES["qwen3-30b-a3b"], get_quant_scheme("int4_w4a16")
    got = kernel_split.tile_tables("n32=16x32x128x4x4/16x64x256x8x3 w=16x128x128x4x4/16x128x128x4x4", shape,
                                   "int4_w4a16", 9, (1, 128), str(tmp_path), device_name="GPU X")
    assert [n for n, _ in got] == ["n32", "w"]
    tables = configs._load_tables(tuple(configs._tuned_files(got[0][1]))[-1:])
    key = sc.table_key((1, 128))
    assert tables[("GPU X", 128, 1536, 2048, key)] == {16: configs.TileConfig(16, 32, 128, 1, 4, 4)}
    assert tables[("GPU X", 128, 2048, 768, key)] == {16: configs.TileConfig(16, 64, 256, 1, 8, 3)}
    with pytest.raises(ValueError, match="NAME=GEMM1/GEMM2"):
        kernel_split.tile_tables("bad=16x32x128x4x4", shape, "int4_w4a16", 1, (1, 128), str(tmp_path), "GPU X")


def test_kernel_split_env_variants_run_under_their_switches_then_restore_them(tmp_path, monkeypatch):
    """--envs: each cell runs once more per variant under its switches (prefix added, plans cleared), in order, and
    the environment is as it was afterwards; a malformed spec fails before any cell."""
    import os

    from benchmarks import kernel_split
    from torch_moe_ops._platform import LOAD_AHEAD_ENV, PDL_ENV

    monkeypatch.setenv(LOAD_AHEAD_ENV, "1")
    monkeypatch.delenv(PDL_ENV, raising=False)
    seen, real = [], kernel_split._timed_row

    def spy(*args):
        seen.append((os.environ.get(LOAD_AHEAD_ENV), os.environ.get(PDL_ENV)))
        return real(*args)

    monkeypatch.setattr(kernel_split, "_timed_row", spy)
    assert kernel_split.main(["--smoke", "--out", str(tmp_path), "--schemes", "none", "--tokens", "1",
                              "--envs", "a0=LOAD_AHEAD=0 both=LOAD_AHEAD=2,PDL=1"]) == 0
    rows = json.loads((tmp_path / "kernel_split.json").read_text())["rows"]
    assert [r["envs"] for r in rows] == ["", "a0", "both"]
    assert seen == [("1", None), ("0", None), ("2", "1")]
    assert os.environ[LOAD_AHEAD_ENV] == "1" and PDL_ENV not in os.environ
    with pytest.raises(ValueError, match="NAME=SWITCH=VALUE"):
        kernel_split.main(["--smoke", "--out", str(tmp_path), "--envs", "a0=LOAD_AHEAD"])


def test_host_ab_compiles_each_variant_once_and_pairs_the_rounds(tmp_path, monkeypatch):
    """benchmarks.host_ab on CPU: every variant gets graphs of its own (a fresh code object each, so Dynamo does
    not serve the second variant the first one's graph), traced under its environment (the package's compile mode
    is read at trace time), restored afterwards; rows hold each variant's marginal and the paired difference."""
    from benchmarks import host_ab
    from torch._dynamo.utils import counters

    from torch_moe_ops._platform import COMPILE_ENV, compile_mode

    seen = []
    real = host_ab._compile

    def spy(stack, x, name, env, backend, device):
        fn, s = real(stack, x, name, env, backend, device)
        seen.append((name, counters["stats"]["unique_graphs"]))
        return fn, s

    modes = []
    monkeypatch.setattr(host_ab, "_compile", spy)
    monkeypatch.setattr(host_ab, "_environment", _recording(host_ab._environment, modes, compile_mode))
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    counters.clear()
    assert host_ab.main(["--smoke", "--out", str(tmp_path), "--variants", f"a={COMPILE_ENV}=plans",
                         f"b={COMPILE_ENV}=opaque", "--schemes", "none", "--tokens", "1"]) == 0
    assert [n for n, _ in seen] == ["a", "a_nomoe", "b", "b_nomoe"]
    assert [g for _, g in seen] == [1, 2, 3, 4], seen  # one new graph per compile
    assert modes[:4] == ["plans", "plans", "opaque", "opaque"] and COMPILE_ENV not in os.environ
    row = json.loads((tmp_path / "host_ab.json").read_text())["rows"][0]
    assert set(row["variants"]) == {"a", "b"} and "minus_first_us" in row["variants"]["b"]
    assert row["variants"]["a"]["env"] == {COMPILE_ENV: "plans"}


def test_host_ab_variant_specs():
    from benchmarks import host_ab

    assert host_ab._variant("e=eager") == ("e", None)
    assert host_ab._variant("s=A=1,B=x=y") == ("s", {"A": "1", "B": "x=y"})
    for bad in ("=A=1", "s=A", "s=A=1,B"):
        with pytest.raises(Exception, match="NAME=VAR=VALUE"):
            host_ab._variant(bad)


def _recording(environment, modes, compile_mode):
    from contextlib import contextmanager

    @contextmanager
    def wrapped(assignments):
        with environment(assignments):
            modes.append(compile_mode())
            yield

    return wrapped
