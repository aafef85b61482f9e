"""GPU only: sweep the fp8_tensor quantizer's scheduling knobs over shard sizes below and above L2.

``python3 tools/quant_sweep.py`` prints GB/s (2 B read + 1 B written per element) and the fraction of copy
bandwidth for every (shape, chunk, lag slack, reverse, warps), checking each result bit for bit against
the first configuration's. ``--diagnose`` times the amax items alone, the quantize items alone and the
one-pass fp8_channel kernel on the same tensors; ``--once`` runs each kernel once (for ``ncu``). Used to
pick ``_kernels/quant_tensor.py``'s defaults; not part of the test suite.
"""
from __future__ import annotations

import itertools
import sys

import torch
from triton.testing import do_bench

from benchmarks.shapes import QUANT_SHAPES as SHAPES
from torch_moe_ops._kernels import quant, quant_tensor
from torch_moe_ops.schemes import get_weight_format

FP8_TENSOR, FP8_CHANNEL = get_weight_format("fp8_tensor"), get_weight_format("fp8_channel")


def diagnose(once: bool):
    for name, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(shape, device="cuda", dtype=torch.float8_e4m3fn)
        s2, sc = torch.empty(shape[0], 2, device="cuda"), torch.empty(shape[:2], device="cuda")
        for label, phases, fmt, scale in (("both", 3, FP8_TENSOR, s2), ("amax-only", 1, FP8_TENSOR, s2),
                                          ("quant-only", 2, FP8_TENSOR, s2), ("fp8_channel", 3, FP8_CHANNEL, sc)):
            quant_tensor._TENSOR_PHASES = phases
            run = lambda: quant.quantize_weight_into(w, q, scale, fmt, None, 2 if scale is s2 else 1)  # noqa: E731
            run()
            torch.cuda.synchronize()
            if not once:
                ms = do_bench(run, warmup=10, rep=60, return_mode="median")
                print(f"{name:<13} {label:<12} {ms:7.3f} ms  {w.numel() * 2 / ms / 1e6:6.0f} GB/s of bf16 read", flush=True)
        quant_tensor._TENSOR_PHASES = 3
        del w, q
        torch.cuda.empty_cache()


def main():
    if "--diagnose" in sys.argv or "--once" in sys.argv:
        return diagnose("--once" in sys.argv)
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    copy = 2 * n / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    del src, dst
    print(f"copy {copy:.0f} GB/s; L2 {torch.cuda.get_device_properties(0).L2_cache_size / 2**20:.0f} MiB", flush=True)
    for name, shape in SHAPES.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(shape, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(shape[0], 2, device="cuda")
        want = None
        for chunk, slack, reverse, warps in itertools.product((8192, 16384, 32768), (0, 128, 256, 512), (False, True), (4, 8)):
            qt = quant_tensor
            qt._CHUNK, qt._LAG_SLACK, qt._REVERSE_QUANT, qt._TENSOR_WARPS = chunk, slack, reverse, warps
            run = lambda: quant.quantize_weight_into(w, q, s, FP8_TENSOR, None, 2)  # noqa: E731
            run()
            if want is None:
                want = (q.view(torch.uint8).clone(), s.clone())
            ok = torch.equal(q.view(torch.uint8), want[0]) and torch.equal(s, want[1])
            ms = do_bench(run, warmup=10, rep=60, return_mode="median")
            gbps = 3 * w.numel() / ms / 1e6
            print(f"{name:<13} chunk={chunk:<6} slack={slack:<4} reverse={int(reverse)} warps={warps} "
                  f"{ms:7.3f} ms {gbps:6.0f} GB/s {100 * gbps / copy:5.1f}% {'ok' if ok else 'MISMATCH'}", flush=True)
            q.zero_()
        del w, q, s
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
