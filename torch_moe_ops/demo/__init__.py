"""The main job, ``python -m torch_moe_ops demo``: random Qwen3-MoE-shaped experts, ``torch.compile`` over
``fused_moe`` in bf16 and every quantized scheme of the registry (one table of accuracy, size and speed),
then the checkpoint pipeline: meta-device model, streaming online quantization, compile, reload in place.

- ``table.py``: the per-scheme op table (``run_ops``);
- ``pipeline.py``: the load / quantize / reload pipeline (``run_pipeline``).
"""
from __future__ import annotations

import argparse

import torch

from ..schemes import QUANT_SCHEMES


def _scheme_list(text: str) -> str:
    """argparse type of ``--schemes``: a comma-separated subset of the registry."""
    bad = [s for s in text.split(",") if s not in QUANT_SCHEMES]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {bad or [text]}; choose from {', '.join(QUANT_SCHEMES)}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    names = ",".join(QUANT_SCHEMES)
    p.add_argument("--experts", type=int, default=32, help="E (Qwen3-30B-A3B: 128)")
    p.add_argument("--top-k", type=int, default=8, help="k (Qwen3-30B-A3B: 8)")
    p.add_argument("--hidden", type=int, default=256, help="H (Qwen3-30B-A3B: 2048)")
    p.add_argument("--intermediate", type=int, default=96, help="I per expert (Qwen3-30B-A3B: 768)")
    p.add_argument("--tokens", type=int, default=64, help="T")
    p.add_argument("--schemes", default=names, type=_scheme_list, help="comma-separated subset of " + names)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=10, help="timed calls per scheme")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4, help="layers of the pipeline checkpoint")
    p.add_argument("--quant", default="fp8_channel", choices=tuple(QUANT_SCHEMES),
                   help="online scheme for the pipeline")
    p.add_argument("--skip-ops", action="store_true", help="only the load/quantize/reload pipeline")
    p.add_argument("--skip-pipeline", action="store_true", help="only the per-scheme op table")


def run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline
    from .table import run_ops

    rc = 0 if args.skip_ops else run_ops(args)
    if not args.skip_pipeline:
        rc = rc or run_pipeline(args)
    return rc


__all__ = ["add_arguments", "run"]
