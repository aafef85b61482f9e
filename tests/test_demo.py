"""The demo (``make demo`` = ``python -m torch_moe_ops demo``): the HF drop-in table on a tiny Qwen3-MoE, its
floors, decode speed measured through ``model.generate`` with a KV cache (eager; compiled the transformers way:
static cache + ``compile_config``), the one-line error without transformers, and the layer demo still reachable
with ``--layer``."""
import argparse
import json
import math
import os

import pytest
import torch

from torch_moe_ops.__main__ import main
from torch_moe_ops.demo import DEFAULTS, add_arguments, resolve

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROWS = ["hf", "none", "fp8_block", "int8_w8a16", "int4_w4a16"]
#: Floors of the logits' SQNR vs transformers bf16, in dB. bf16: docs/transformers.md promises 35 dB (ours
#: differs only by fp32 accumulation and fp32 router weights; measured 47-49 dB over 20 seeds at these sizes).
#: fp8 / int8 / int4: design.md §13's per-block floors (20 / 20 / 13 dB); the logits, one layer and the
#: lm_head further on, measured 29.5-33 / 42-45 / 19.7-23 dB over 20 seeds.
FLOORS = {"none": 35.0, "fp8_block": 20.0, "int8_w8a16": 20.0, "int4_w4a16": 13.0}
TINY = ["--layers", "1", "--experts", "6", "--top-k", "2", "--hidden", "128", "--intermediate", "64", "--vocab",
        "256", "--tokens", "8", "--new-tokens", "3"]


def _args(*extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return resolve(p.parse_args([*TINY, *extra]))


@pytest.fixture(scope="module")
def result():
    pytest.importorskip("transformers")
    from torch_moe_ops.demo.hf import hf_demo

    # backend "eager": dynamo's whole-model trace (fullgraph, dynamic) without Inductor's minute of codegen
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = hf_demo(_args("--compile", "none", "--backend", "eager", "--device", "cpu"))
        out.threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return out


def test_threads_set_for_the_run_then_restored(result):
    assert "CPU threads: 1;" in result.header[1] and result.threads_after == 2


def test_rows_and_sqnr_floors(result):
    rows = {r.key: r for r in result.rows}
    assert [r.key for r in result.rows] == ROWS
    assert rows["hf"].sqnr_db is None and rows["hf"].same_tokens == 3
    for key, floor in FLOORS.items():
        r = rows[key]
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > floor, (key, r.sqnr_db)
        assert math.isfinite(r.sqnr_fp32_db) and 0 <= r.same_tokens <= 3 and r.eager_tps > 0
        assert r.replaced == "1 MoE blocks replaced, 0 left as they were"
    # ours in bf16 is no further from fp32 than transformers' own bf16 (docs/transformers.md)
    assert rows["none"].sqnr_fp32_db > rows["hf"].sqnr_fp32_db - 1.0
    assert rows["fp8_block"].config == "Fp8Config(scheme='block', block_shape=(128, 128))"
    assert rows["int4_w4a16"].config == "Int4Config(group_size=64)"  # the largest G dividing I = 64


def test_weight_bytes_and_load_peak(result):
    rows = {r.key: r for r in result.rows}
    assert rows["none"].weights_bytes == rows["hf"].weights_bytes
    assert rows["hf"].weights_bytes > rows["fp8_block"].weights_bytes > rows["int4_w4a16"].weights_bytes
    assert rows["int8_w8a16"].weights_bytes > rows["int4_w4a16"].weights_bytes
    if os.path.exists("/proc/self/status"):
        assert "VmRSS" in result.peak_label
        assert all(r.peak_bytes > r.weights_bytes / 2 for r in result.rows)  # the load allocates its weights


def test_only_the_chosen_rows_compile_into_one_graph(result):
    rows = {r.key: r for r in result.rows}
    r = rows["none"]
    assert r.graphs == 1 and r.compiled_tps > 0 and r.compile_s > 0
    assert r.compiled_same_tokens == 3  # backend eager: the same kernels, the same tokens
    assert all(rows[k].compiled_tps is None and rows[k].graphs is None for k in ROWS if k != "none")


def test_table(result):
    from torch_moe_ops.demo.hf_table import COLUMNS, format_table

    lines = format_table(result)
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert [t for t, _ in COLUMNS if t not in lines[head]] == []
    body = lines[head + 2: head + 2 + len(ROWS)]
    assert [line.split("  ")[0] for line in body] == ["transformers bf16", "ours bf16", "ours fp8_block",
                                                      "ours int8_w8a16", "ours int4_w4a16"]
    assert all(len(line) == len(lines[head]) for line in body)  # one column grid
    assert body[0].split()[2] == "ref" and "not compiled: hf, fp8_block, int8_w8a16, int4_w4a16" in "\n".join(lines)


def test_checkpoint_is_sharded_with_an_index(tmp_path):
    pytest.importorskip("transformers")
    from torch_moe_ops.demo.hf_checkpoint import qwen3_moe_config, write_checkpoint

    cfg = qwen3_moe_config(layers=1, experts=6, top_k=2, hidden=128, intermediate=64, vocab=256)
    info = write_checkpoint(str(tmp_path), cfg, seed=0)
    shards = [f for f in info["files"] if f.endswith(".safetensors")]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    # save_pretrained writes Qwen3-MoE's original per-expert names, as the checkpoints on the Hub have them
    assert "config.json" in info["files"] and "model.layers.0.mlp.experts.5.down_proj.weight" in index["weight_map"]


def test_bad_sizes_fail_before_any_work():
    pytest.importorskip("transformers")
    from torch_moe_ops.demo.hf import hf_demo

    with pytest.raises(SystemExit, match="--schemes: int4_w4a16: no scale tile fits"):
        hf_demo(_args("--hidden", "100", "--schemes", "none,int4_w4a16"))
    with pytest.raises(ValueError, match="--tokens"):
        hf_demo(_args("--tokens", "1"))
    with pytest.raises(ValueError, match="--new-tokens"):
        hf_demo(_args("--new-tokens", "1"))


def test_generation_setup_and_decode_rate():
    """eager: transformers' default DynamicCache, no compile; compiled: static cache + CompileConfig(mode="default",
    fullgraph) -- what generate compiles the decode step with; the rate is a difference of two generate calls."""
    pytest.importorskip("transformers")
    from tests.hf_models import make
    from torch_moe_ops.demo import measure

    model = make("qwen3_moe")
    measure.generation_setup(model, compiled=False)
    gc = model.generation_config
    assert gc.cache_implementation is None and gc.disable_compile and gc.eos_token_id is None
    calls = []
    real = model.generate

    def generate(ids, **kw):
        calls.append(kw["max_new_tokens"])
        assert kw["do_sample"] is False and "use_cache" not in kw  # the KV cache stays on (the default)
        return real(ids, **kw)

    model.generate = generate
    prompt = torch.randint(96, (2, 5))
    with torch.no_grad():
        ids, step_s = measure.decode_rate(model, prompt, 4)
    assert calls == [4, 1] and ids.shape == (2, 9) and step_s > 0
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        measure.decode_rate(model, prompt, 1)
    measure.generation_setup(model, compiled=True, backend="eager")
    cc = gc.compile_config
    assert gc.cache_implementation == "static" and not gc.disable_compile
    assert (cc.mode, cc.fullgraph, cc.dynamic, cc.backend) == ("default", True, False, "eager")
    assert cc._compile_all_devices  # a CPU model: transformers compiles only with this flag


def test_defaults_per_demo():
    assert (_args().experts, _args("--layer").experts) == (6, 6)  # given flags win
    p = argparse.ArgumentParser()
    add_arguments(p)
    for flag, mode in (([], "hf"), (["--layer"], "layer")):
        args = resolve(p.parse_args(flag))
        assert {k: getattr(args, k) for k in DEFAULTS[mode]} == DEFAULTS[mode]
    assert _args("--compile", "all").compile == frozenset(ROWS + ["fp8_tensor", "fp8_channel", "mxfp4"])
    assert _args("--compile", "off").compile == frozenset()
    assert _args().compile == frozenset({"hf", "none", "fp8_block"})  # transformers and ours, compiled, by default
    with pytest.raises(SystemExit):
        _args("--compile", "fp8")


def test_without_transformers_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "pip install 'torch-moe-ops[hf]'" in err


def test_layer_demo_still_reachable(capsys):
    rc = main(["demo", "--layer", "--device", "cpu", "--experts", "4", "--top-k", "2", "--hidden", "64",
               "--intermediate", "32", "--tokens", "4", "--schemes", "none", "--iters", "1", "--skip-pipeline"])
    out = capsys.readouterr().out
    assert rc == 0 and "fused_moe, E=4 k=2 H=64 I=32 T=4" in out and "\nnone " in out
    torch._dynamo.reset()


@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_channel", "fp8_block", "int8_w8a16", "int4_w4a16", "mxfp4"])
def test_every_scheme_has_a_pipeline_config(scheme):
    """``demo --layer --quant <scheme>`` loads in every scheme (mxfp4 once failed here: 'no FusedMoE config')."""
    from torch_moe_ops.demo.pipeline import quant_config
    from torch_moe_ops.schemes import get_quant_scheme

    cfg = quant_config(scheme, 256, 96)  # int4: the largest group dividing both (32)
    assert cfg.quant_scheme is get_quant_scheme(scheme)
    assert quant_config("none", 256, 96) is None


def test_table_widens_a_column_for_a_wide_cell(result):
    """A slow machine's figures (here a 12345.67 s load) widen their column instead of breaking the grid."""
    import dataclasses

    from torch_moe_ops.demo.hf_table import format_table

    slow = dataclasses.replace(result, rows=[dataclasses.replace(result.rows[0], load_s=12345.67), *result.rows[1:]])
    lines = format_table(slow)
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    body = lines[head + 2: head + 2 + len(ROWS)]
    assert "12345.67" in body[0] and all(len(line) == len(lines[head]) for line in body)
