"""The HF drop-in demo (the default of ``python -m torch_moe_ops demo``): a random-weight Qwen3-MoE saved by
transformers as a sharded safetensors folder, loaded by transformers (bf16, the reference) and by
``torch_moe_ops.integrations.transformers.from_pretrained`` in bf16 and with experts quantized while they
stream; one row per model: SQNR of the logits vs the reference, steady decode tokens/s of ``model.generate``
(greedy, KV cache) eager and compiled the transformers way (static cache + ``compile_config``), load time,
weight bytes and the load's peak memory.

- ``hf_checkpoint.py``: the config and the checkpoint; ``measure.py``: memory and generation timing;
- ``hf_table.py``: the printed table.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ..testing import sqnr_db
from .hf_checkpoint import qwen3_moe_config, write_checkpoint
from .measure import LoadPeak, decode_rate, generation_setup, model_bytes, warm_up

REFERENCE = "hf"  #: the row key of the transformers bf16 model in ``--compile``


@dataclass
class Row:
    """One model of the table. sqnr_db / sqnr_fp32_db: of the prompt's logits vs the reference (None for the
    reference) / vs transformers in fp32 on the same bf16 weights; same_tokens: leading generated tokens equal
    to the reference's; *_tps: steady decode tokens per second of ``generate`` (``measure.decode_rate``);
    compile_s: the first compiled ``generate`` (tracing + codegen + its tokens); compiled_same_tokens: leading
    compiled tokens equal to the eager ones; graphs: graphs dynamo compiled (the decode step: 1 expected);
    peak_bytes: see ``measure.LoadPeak``."""

    name: str
    key: str
    config: str
    load_s: float
    weights_bytes: int
    peak_bytes: int | None
    eager_tps: float
    same_tokens: int
    sqnr_db: float | None = None
    sqnr_fp32_db: float | None = None
    compiled_tps: float | None = None
    compile_s: float | None = None
    compiled_same_tokens: int | None = None
    graphs: int | None = None
    replaced: str = ""  #: ours: what ``from_pretrained``'s report says it replaced
    peak_label: str = ""  #: what ``peak_bytes`` is (``LoadPeak.label``)


@dataclass
class HFResult:
    rows: list[Row]
    peak_label: str
    header: list[str] = field(default_factory=list)
    new_tokens: int = 0
    backend: str = "inductor"


@contextlib.contextmanager
def _quiet_transformers():
    """No per-file progress bars from transformers while the demo saves and loads (its table is the output)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _threads(n: int, device: torch.device):
    """``torch.set_num_threads(n)`` for a CPU run (n = 0: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress on stderr: stdout is the table


def _leading_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a == b).int().cumprod(-1).sum())  # host-ok: demo reporting, outside the forward


def _measure(name, key, config, load, prompt, args, ref, fp32_logits) -> tuple[Row, torch.Tensor, torch.Tensor]:
    """Load with ``load()`` under ``LoadPeak``, then time ``model.generate`` eager (and, for rows in
    ``args.compile``, compiled): steady decode tokens/s with a KV cache (``measure.decode_rate``). ref: None for
    the reference, else its (logits, generated ids). fp32_logits: [1, S, V]. Returns (row, logits [1, S, V]
    fp32, generated ids [1, S + n])."""
    device = prompt.device
    _say(f"  {name}: loading")
    with LoadPeak(device) as mem:
        start = time.perf_counter()
        model = load()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - start
    report = getattr(model, "torch_moe_ops_report", None)
    with torch.no_grad():
        logits = model(input_ids=prompt, use_cache=False).logits.float()  # also the eager warm-up
        generation_setup(model, compiled=False)
        warm_up(model, prompt, min(4, args.new_tokens))
        ids, step_s = decode_rate(model, prompt, args.new_tokens)
        row = Row(name, key, config, load_s, model_bytes(model), mem.bytes, 1 / step_s,
                  args.new_tokens if ref is None else _leading_equal(ids[:, prompt.shape[1]:], ref[1]))
        row.sqnr_fp32_db = sqnr_db(fp32_logits, logits)
        if ref is not None:
            row.sqnr_db = sqnr_db(ref[0], logits)
        row.peak_label = mem.label
        if report is not None:
            row.replaced = f"{len(report.replaced)} MoE blocks replaced, {len(report.skipped)} left as they were"
        if key in args.compile:
            _say(f"  {name}: torch.compile (backend {args.backend}); this is the slow part on a CPU")
            _compiled(row, model, prompt, ids, args)
    del model
    return row, logits, ids


def _compiled(row: Row, model, prompt, eager_ids, args) -> None:
    """transformers' own compile path (``measure.generation_setup``: static cache + ``CompileConfig``); the
    first ``generate`` traces and compiles the decode step (``compile_s``), then the same timing as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # each model compiles from scratch: fair compile times, no recompile limit
    counters.clear()
    generation_setup(model, compiled=True, backend=args.backend, fullgraph=True, dynamic=False)
    row.compile_s = warm_up(model, prompt, args.new_tokens)
    ids, step_s = decode_rate(model, prompt, args.new_tokens)
    row.compiled_tps = 1 / step_s
    row.compiled_same_tokens = _leading_equal(ids[:, prompt.shape[1]:], eager_ids[:, prompt.shape[1]:])
    row.graphs = int(counters["stats"]["unique_graphs"])
    generation_setup(model, compiled=False)
    torch._dynamo.reset()


def hf_demo(args) -> HFResult:
    """Run the HF demo with the sizes of ``args`` (already resolved: see ``demo.resolve``) and return its rows.

    args: layers, experts, top_k, hidden, intermediate, vocab, tokens (prompt length), new_tokens, schemes
    (comma-separated registry names), compile (set of row keys), backend, device, seed, threads (0: torch's default)."""
    from transformers import AutoModelForCausalLM, __version__ as hf_version

    from .. import _platform
    from ..integrations.transformers import from_pretrained
    from ..schemes import get_quant_scheme
    from .pipeline import quant_config

    if args.tokens < 2:
        raise ValueError(f"--tokens (the prompt length) must be >= 2, got {args.tokens}")
    if args.new_tokens < 2:  # the decode rate is a difference of two generate calls
        raise ValueError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    device = torch.device(args.device)
    H, I = args.hidden, args.intermediate
    configs = [(get_quant_scheme(s).name, quant_config(s, H, I, flag="--schemes")) for s in args.schemes.split(",")]
    cfg = qwen3_moe_config(layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=H, intermediate=I,
                           vocab=args.vocab)
    bf16 = torch.bfloat16
    with tempfile.TemporaryDirectory() as path, _quiet_transformers(), _threads(args.threads, device):
        info = write_checkpoint(path, cfg, args.seed)
        shards = sum(f.endswith(".safetensors") for f in info["files"])
        header = [f"Qwen3-MoE (random weights), {args.layers} layers, E={args.experts} k={args.top_k} H={H} I={I}, "
                  f"vocab {args.vocab}: {info['bytes'] / 2**20:.1f} MiB bf16 in {shards} safetensors files + "
                  f"model.safetensors.index.json (save_pretrained)",
                  f"device {_platform.describe(device)}, torch {torch.__version__}, transformers {hf_version}, "
                  f"CPU threads: {torch.get_num_threads()}; prompt {args.tokens} random tokens, batch 1"]
        _say("HF demo: " + header[0])
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(args.vocab, (1, args.tokens), generator=gen).to(device)

        def load_hf(dtype=bf16):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

        with torch.no_grad():  # the bf16 weights upcast: what bf16 compute costs transformers itself
            fp32_logits = load_hf(torch.float32)(input_ids=prompt, use_cache=False).logits.float()
        ref_row, ref_logits, ref_ids = _measure("transformers bf16", REFERENCE, "AutoModelForCausalLM", load_hf,
                                                prompt, args, None, fp32_logits)
        rows, ref = [ref_row], (ref_logits, ref_ids[:, args.tokens:])
        for scheme, qc in configs:
            def load(qc=qc):
                return from_pretrained(path, qc, device=device, dtype=bf16, progress=False)

            name = "ours bf16" if qc is None else f"ours {scheme}"
            row, _, _ = _measure(name, scheme, repr(qc) if qc is not None else "None", load, prompt, args, ref,
                                 fp32_logits)
            rows.append(row)
    return HFResult(rows, rows[0].peak_label, header, args.new_tokens, args.backend)


def run_hf(args) -> int:
    from .hf_table import format_table

    result = hf_demo(args)
    print("\n".join(format_table(result)))
    return 0 if all(" 0 left" in r.replaced for r in result.rows[1:]) else 1


__all__ = ["HFResult", "Row", "hf_demo", "run_hf"]
