"""``python -m torch_moe_ops {demo,info}``: the main job, and what this install runs on."""
from __future__ import annotations

import argparse
import sys

_DESCRIPTION = """torch-moe-ops command line.

subcommands:
  demo   the Hugging Face drop-in: save a random-weight Qwen3-MoE as a sharded safetensors checkpoint, load it
         with transformers (bf16) and with torch_moe_ops' from_pretrained (bf16, fp8 block, int8, int4), print
         one table (logits SQNR, decode tokens/s of generate with a KV cache, eager and compiled, load peak
         memory); needs the [hf] extra.
         demo --layer: compile fused_moe in every scheme on random experts (accuracy, size, speed), then load,
         quantize online, compile and reload a meta-device model in place
  info   versions, device, the backend that serves CPU and CUDA tensors, the tuned tile table that applies,
         interpreter and debug switches
"""


def info() -> int:
    """Print one ``key: value`` line per fact (nothing here needs a GPU)."""
    import os
    import platform

    import torch

    from . import __version__, _platform
    from .schemes import QUANT_SCHEMES

    lines = {"torch-moe-ops": __version__, "python": platform.python_version(), "torch": torch.__version__}
    if _platform.has_triton():
        import triton

        lines["triton"] = triton.__version__
    else:
        lines["triton"] = "not installed (CUDA tensors need it; CPU uses the references)"
    try:
        lines["cpu backend"] = {"reference": "reference (pure PyTorch)",
                                "triton": "triton (interpreter)"}[_platform.cpu_backend()]
    except (ValueError, RuntimeError) as exc:
        lines["cpu backend"] = f"misconfigured: {exc}"
    lines["TRITON_INTERPRET"] = "1 (Triton kernels run in the CPU interpreter)" if _platform.interpret_mode() else "off"
    lines[_platform.DEBUG_ENV] = "1 (value checks on CUDA inputs: may synchronize)" if _platform.debug_checks() else "off"
    if _platform.has_cuda():
        idx = torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        lines["device"] = f"cuda:{idx} {name} (sm_{''.join(map(str, torch.cuda.get_device_capability(idx)))})"
        lines["tuned tiles"] = _tuned_summary(name, torch.cuda.get_device_capability(idx))
    else:
        lines["device"] = "cpu (no CUDA device visible)"
        lines["tuned tiles"] = "not used on CPU (interpreter tiles)"
    extra = os.environ.get("TORCH_MOE_OPS_TUNED_DIR")
    if extra:
        lines["TORCH_MOE_OPS_TUNED_DIR"] = extra
    lines["quant schemes"] = ", ".join(QUANT_SCHEMES)
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _tuned_summary(device_name: str, capability=None) -> str:
    """Which tuned table serves this GPU: its own, else its compute-capability family's (an H200 takes an
    H100's, ``configs.family``), else none (heuristic tiles)."""
    from . import _platform

    if not _platform.has_triton():
        return "unavailable (no triton)"
    from ._kernels import configs

    tables = configs.tuned_tables()
    entries = [k for k in tables if k[0] == device_name]
    if entries:
        return f"{len(entries)} tuned (E, N, K, scheme) entries for {device_name!r}"
    fam = configs.family(capability) if capability is not None else None
    shared = [k for k in tables if fam is not None and k[0] == fam]
    if shared:
        return f"none for {device_name!r}; {len(shared)} entries of its family {fam} (another GPU's tiles)"
    return f"none for {device_name!r}: heuristic tiles (see docs/kernels.md to tune)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_moe_ops", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,info}")
    from .demo import add_arguments, run

    demo = sub.add_parser("demo", help="the Hugging Face drop-in table (--layer: the layer demo)",
                          description="The Hugging Face drop-in: a saved Qwen3-MoE checkpoint loaded by transformers "
                                      "and by torch_moe_ops, one table. --layer: the per-scheme op table, then the "
                                      "load / quantize / reload pipeline.")
    add_arguments(demo)
    sub.add_parser("info", help="versions, device, backend, tuned tiles", description=info.__doc__)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                demo.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
        if not args.layer:
            try:
                import transformers  # noqa: F401
            except ImportError:  # one line, no usage: nothing was wrong with the arguments
                demo.exit(2, f"{demo.prog}: error: the Hugging Face demo needs transformers: "
                             "pip install 'torch-moe-ops[hf]' (or run demo --layer)\n")
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
