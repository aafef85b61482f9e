"""The main job, ``python -m torch_moe_ops demo`` (and ``make demo``).

By default the Hugging Face drop-in: a random-weight Qwen3-MoE saved as a sharded safetensors checkpoint,
loaded by transformers (bf16, the reference) and by ``integrations.transformers.from_pretrained`` in bf16 and
quantized while the experts stream; one table of logits SQNR, steady decode tokens/s of ``model.generate`` (KV
cache) eager and compiled (static cache + ``compile_config``), load peak memory (``hf.py``). Needs the ``[hf]``
extra.

``demo --layer``: the layer demo on random Qwen3-MoE-shaped experts, ``torch.compile`` over ``fused_moe`` in
bf16 and every quantized scheme of the registry (``table.py``), then the load / quantize / reload pipeline of
a meta-device model (``pipeline.py``).
"""
from __future__ import annotations

import argparse

import torch

from ..schemes import QUANT_SCHEMES

#: Defaults that differ between the two demos (argparse defaults are None, ``resolve`` fills them in).
#: HF: I = 128 and H = 256 suit every config (fp8 128x128 tiles, int4 G = 128); 3 layers keep the first Inductor
#: compile (the decode step, static cache) near 20 s on a 2-core CPU.
DEFAULTS = {
    "hf": dict(experts=30, top_k=4, hidden=256, intermediate=128, tokens=16, layers=3,
               schemes="none,fp8_block,int8_w8a16,int4_w4a16"),
    "layer": dict(experts=32, top_k=8, hidden=256, intermediate=96, tokens=64, layers=4,
                  schemes=",".join(QUANT_SCHEMES)),
}
HF_ROWS = ("hf", *QUANT_SCHEMES)  #: row keys ``--compile`` accepts: the transformers model, then our schemes
#: rows compiled by default: transformers and ours in bf16, ours in fp8 (Inductor: ~20 s cold for the first model on
#: a 2-core CPU, 3-6 s for the next ones, which reuse its attention kernels; ``--compile all``: ~55 s in all)
DEFAULT_COMPILE = ("hf", "none", "fp8_block")


def _scheme_list(text: str) -> str:
    """argparse type of ``--schemes``: a comma-separated subset of the registry."""
    bad = [s for s in text.split(",") if s not in QUANT_SCHEMES]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {bad or [text]}; choose from {', '.join(QUANT_SCHEMES)}")
    return text


def _compile_rows(text: str) -> frozenset:
    """argparse type of ``--compile``: ``all``, ``off`` or a comma-separated subset of ``HF_ROWS``."""
    if text in ("all", "off"):
        return frozenset(HF_ROWS if text == "all" else ())
    rows = [s for s in text.split(",") if s]
    bad = [s for s in rows if s not in HF_ROWS]
    if bad or not rows:
        raise argparse.ArgumentTypeError(f"unknown row(s) {bad or [text]}; choose all, off or from "
                                         f"{', '.join(HF_ROWS)}")
    return frozenset(rows)


def _either(key: str, what: str) -> str:
    return f"{what} (default {DEFAULTS['hf'][key]}; with --layer {DEFAULTS['layer'][key]})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    names = ",".join(QUANT_SCHEMES)
    p.add_argument("--layer", action="store_true",
                   help="the layer demo (op table on random experts + load/quantize/reload pipeline) instead of "
                        "the Hugging Face one")
    p.add_argument("--experts", type=int, help=_either("experts", "E (Qwen3-30B-A3B: 128)"))
    p.add_argument("--top-k", type=int, help=_either("top_k", "k (Qwen3-30B-A3B: 8)"))
    p.add_argument("--hidden", type=int, help=_either("hidden", "H (Qwen3-30B-A3B: 2048)"))
    p.add_argument("--intermediate", type=int, help=_either("intermediate", "I per expert (Qwen3-30B-A3B: 768)"))
    p.add_argument("--tokens", type=int, help=_either("tokens", "T; the HF demo's prompt length"))
    p.add_argument("--layers", type=int, help=_either("layers", "decoder layers (HF) / layers of the pipeline"))
    p.add_argument("--schemes", type=_scheme_list,
                   help=_either("schemes", "comma-separated subset of " + names + "; HF: one row each"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    hf = p.add_argument_group("Hugging Face demo")
    hf.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    hf.add_argument("--new-tokens", type=int, default=16,
                    help="n: decode tokens/s = (n - 1) / (t(generate n) - t(generate 1)), greedy (default 16; >= 2)")
    hf.add_argument("--compile", type=_compile_rows, default=frozenset(DEFAULT_COMPILE), metavar="ROWS",
                    help="rows to also run compiled (static cache + compile_config): all, off or a comma-separated "
                         f"subset of {','.join(HF_ROWS)} (hf = transformers bf16); default "
                         f"{','.join(DEFAULT_COMPILE)} (transformers and ours in bf16, ours in fp8), since Inductor "
                         "takes 5-30 s per model on a 2-core CPU")
    hf.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads with --device cpu (default 1: the demo's matrices gain little from more, "
                         "and on a busy machine OpenMP threads spinning against other processes cost 10x; 0: "
                         "torch's default, one per core)")
    hf.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                    help="torch.compile backend (default inductor)")
    layer = p.add_argument_group("layer demo (--layer)")
    layer.add_argument("--iters", type=int, default=10, help="timed calls per scheme")
    layer.add_argument("--quant", default="fp8_channel", choices=tuple(QUANT_SCHEMES),
                       help="online scheme for the pipeline")
    layer.add_argument("--skip-ops", action="store_true", help="only the load/quantize/reload pipeline")
    layer.add_argument("--skip-pipeline", action="store_true", help="only the per-scheme op table")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the arguments left at None with the chosen demo's defaults (in place; returns ``args``)."""
    for key, value in DEFAULTS["layer" if args.layer else "hf"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> int:
    resolve(args)
    if not args.layer:
        from .hf import run_hf

        return run_hf(args)
    from .pipeline import run_pipeline
    from .table import run_ops

    rc = 0 if args.skip_ops else run_ops(args)
    if not args.skip_pipeline:
        rc = rc or run_pipeline(args)
    return rc


__all__ = ["DEFAULTS", "add_arguments", "resolve", "run"]
