"""Compile the package's Triton kernels for Hopper (sm_90a) on a machine without a GPU, and report what the
compiler made of them: registers, spills, shared memory, matrix instructions, SASS size.

Every launch of a real pipeline call (CPU tensors, GPU tile configs of the H100 table or the heuristic) is
compiled instead of run: ``JITFunction.run`` is switched to Triton's warm-up mode under a stand-in driver that
names an sm_90 target. No kernel runs, so outputs are garbage; only the compiled code is looked at. Use the
Triton version the GPU has (3.6 on the device image)::

    pip install --no-deps --target .scratch/t36 triton==3.6.0
    PYTHONPATH=.scratch/t36 python tools/sm90_compile.py                  # every scheme, T = 1 / 64 / 4096
    PYTHONPATH=.scratch/t36 python tools/sm90_compile.py --schemes mxfp4 --T 1 --sass /tmp/sass

A kernel that fails to compile for the GPU fails here, with Triton's error (the CPU interpreter accepts
constructs the GPU compiler rejects: ``continue`` in a loop, layouts its sm90 passes cannot lower), and the
exit status is 1; ``tests/test_sm90_compile.py`` runs it in CI. Columns: regs / spill bytes (ptxas -v),
shared bytes, the count of HGMMA (Hopper warpgroup MMA), QGMMA (its fp8 form) and HMMA (the older mma.sync)
instructions, and SASS instructions in total and inside the kernel's main loop (the instructions between
the largest backward branch and its target, a proxy for the K loop's cost). Its SASS (``--sass``) shows the
width of every load too.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DEVICE_NAME = "NVIDIA H100 80GB HBM3"


class _Sm90Driver:
    """What ``JITFunction.run`` asks of the active driver, without a GPU: one device, an sm_90 target."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


COMPILED: list = []


def _install(tiles: str | None = None):
    """Warm-up instead of launch, the stand-in driver, GPU tile configs for CPU tensors (``tiles``:
    "BMxBNxBK[xWARPSxSTAGES]" for every GEMM instead)."""
    driver.set_active(_Sm90Driver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and all(k is not kernel for _, k in COMPILED):
            COMPILED.append((self, kernel))
        return kernel

    JITFunction.run = compile_only
    from torch_moe_ops._kernels import configs, fused_experts

    configs.device_name = lambda index: DEVICE_NAME
    configs.device_family = lambda index: "sm90"
    get_config = configs.get_config

    def gpu_config(T, E, N, K, scheme, block, device=None, *, top_k, invariant=False, dtype=None, block_m=None):
        if tiles:
            return configs.TileConfig.parse(tiles)
        return get_config(T, E, N, K, scheme, block, torch.device("cuda", 0), top_k=top_k, invariant=invariant,
                          dtype=dtype, block_m=block_m)

    fused_experts.get_config = gpu_config
    from torch_moe_ops._platform import pdl

    fused_experts.dependent_launch = lambda device: pdl()  # TORCH_MOE_OPS_PDL=1: the GDC variants (sm_90 here)


SETUP_FAILED = 3  #: exit status when this Triton cannot be driven without a GPU (not a kernel's failure)


@triton.jit
def _probe_kernel(x_ptr, N: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, N), tl.arange(0, N).to(tl.float32))


def _probe():
    """One trivial kernel through the patched launcher: the stand-in driver works with this Triton."""
    _probe_kernel[(1,)](torch.empty(16), N=16)
    if not COMPILED or "ptx" not in COMPILED[-1][1].asm:
        raise RuntimeError("the warm-up path produced no PTX")
    COMPILED.clear()


def _tools_bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([_tools_bin("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([_tools_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return out


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_summary(sass: str) -> dict:
    """Instruction counts, and the length of the largest loop (a backward BRA: its target to itself)."""
    instrs = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(sass)]
    ops = [op for _, op, _ in instrs]
    loop = 0
    for addr, op, rest in instrs:
        tgt = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if tgt and int(tgt.group(1), 16) < addr:
            loop = max(loop, sum(1 for a, _, _ in instrs if int(tgt.group(1), 16) <= a <= addr))
    count = lambda p: sum(1 for o in ops if o.startswith(p))  # noqa: E731
    return dict(total=len(ops), loop=loop, hgmma=count("HGMMA"), qgmma=count("QGMMA"), hmma=count("HMMA"))


#: (E, top_k, H, I, activation, biases) of the layers whose GEMMs are compiled
SHAPES = {"qwen3": (128, 8, 2048, 768, "silu", False), "gpt-oss": (32, 4, 2880, 2880, "swigluoai", True)}


def _cases(schemes, tokens, dtypes, backward=False, shape_names=tuple(SHAPES), invariant=False):
    """(label, thunk) of pipeline calls whose launches get compiled: the forward (``invariant``: with
    batch-invariant tiles), and with ``backward`` its gradients."""
    from torch_moe_ops._kernels import fused_experts as kernels
    from torch_moe_ops._kernels.backward import fused_experts_backward
    from torch_moe_ops.schemes import get_activation, get_quant_scheme
    from torch_moe_ops.testing import fitting_block, w13_shards

    from torch_moe_ops._kernels.activation import quant_buffers
    from torch_moe_ops._kernels.align import align_buffers
    from torch_moe_ops._kernels.quant import quantize_weight_into
    from torch_moe_ops._kernels.routing import one_program, topk_route
    from torch_moe_ops.schemes import get_activation_quant

    shapes = {k: v for k, v in SHAPES.items() if k in shape_names}
    for T in tokens:  # routing: softmax, and DeepSeek's grouped sigmoid with a correction bias
        logits = torch.randn(T, 256, dtype=torch.bfloat16)
        yield f"routing T={T}", lambda lg=logits: topk_route(lg, 8)
        yield f"routing grouped T={T}", lambda lg=logits: topk_route(
            lg, 8, True, "sigmoid", 8, 4, torch.zeros(256), 2.5)
        # fused_moe's routing jobs (_kernels/fused_experts.fused_moe): x's fp8 quantization (groups of 128 and 96,
        # per token), and the alignment where one program routes every token (Qwen3's E = 128, an expert_map)
        x = torch.randn(T, 2048, dtype=torch.bfloat16)
        for aq, group in (("fp8_group", 128), ("fp8_group", 96), ("fp8_token", 0)):
            bufs = quant_buffers(T, 2048, get_activation_quant(aq), group, "cpu")
            yield f"routing quant {aq} {group} T={T}", lambda lg=logits, b=bufs, g=group, x=x: topk_route(
                lg, 8, quant_x=(x, *b, g))
    for T in (9,):  # whatever the token list: the routing kernel's alignment needs 1 < T <= its BLOCK_T
        assert one_program(T, 128, 0)
        lg128, emap = torch.randn(T, 128, dtype=torch.bfloat16), torch.arange(128, dtype=torch.int32)
        yield f"routing align T={T}", lambda lg=lg128, m=emap: topk_route(
            lg, 8, align=(align_buffers(lg.shape[0] * 8, 128, 16, "cpu"), 16, m))
    for name in schemes:  # online weight quantization: one expert stack of each format
        fmt = get_quant_scheme(name).weight
        if fmt is not None:
            blk = fitting_block(get_quant_scheme(name), 2048, 768)
            sh = (2 if fmt.sharded else 1,)
            w = torch.randn(2, 1536, 2048, dtype=torch.bfloat16)
            q = torch.empty(fmt.packed_shape(w.shape), dtype=fmt.qdtype)
            sc = torch.empty(fmt.scale_shape(w.shape, blk, *sh), dtype=fmt.scale_dtype)
            yield f"quantize {fmt.name}", lambda w=w, q=q, sc=sc, fmt=fmt, blk=blk, sh=sh: quantize_weight_into(
                w, q, sc, fmt, blk, *sh)
    for name in schemes:
        scheme = get_quant_scheme(name)
        for shape, (E, k, H, I, act_name, bias) in shapes.items():
            act = get_activation(act_name)
            try:
                block = fitting_block(scheme, H, I)
            except ValueError:
                continue
            n1, fmt = act.n1(I), scheme.weight
            if fmt is None:  # weights of the right storage and shape; their values do not matter here
                q13, q2, s13, s2 = torch.zeros(E, n1, H), torch.zeros(E, H, I), None, None
            else:
                q13, q2 = (torch.zeros(fmt.packed_shape((E, N, K)), dtype=fmt.qdtype) for N, K in ((n1, H), (H, I)))
                s13, s2 = (scheme.canonical_scale(torch.ones(fmt.scale_shape((E, N, K), block, *sh),
                                                             dtype=fmt.scale_dtype))
                           for N, K, sh in ((n1, H, (w13_shards(scheme, act),)), (H, I, ())))
            b13 = torch.zeros(E, n1) if bias else None
            b2 = torch.zeros(E, H) if bias else None
            for dtype in dtypes:
                dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
                if scheme.weight is None and dt != torch.bfloat16:
                    continue
                qa, qb = (q13.to(dt), q2.to(dt)) if scheme.weight is None else (q13, q2)
                for T in tokens:
                    x = torch.randn(T, H).to(dt)
                    w, ids = torch.rand(T, E).topk(k, dim=-1)

                    def call(x=x, w=w, ids=ids, qa=qa, qb=qb):
                        kernels.fused_experts(x, qa, qb, w.float(), ids.to(torch.int32), act, scheme, s13, s2, b13,
                                              b2, block, None, False, act.alpha(None), act.limit(None),
                                              invariant=invariant)

                    yield f"{name} {shape} {dtype} T={T}", call
                    if T == 1:  # fused_moe: GEMM1 routes (softmax; DeepSeek's grouped sigmoid with a correction
                        # bias), GEMM2 reads its ids and sums the slots (GEMM1 clears its counts)
                        for label, routing in (("", (k, True, "softmax", 0, 0, None, 1.0)),
                                               (" grouped", (k, True, "sigmoid", 8, 4, torch.zeros(E), 2.5))):
                            def fused_moe(x=x, qa=qa, qb=qb, logits=torch.randn(1, E), routing=routing):
                                kernels.fused_moe(x, logits, routing,
                                                  (qa, qb, act, scheme, s13, s2, b13, b2, block, None, False,
                                                   act.alpha(None), act.limit(None)), invariant=invariant)

                            yield f"{name} {shape} {dtype} T=1 fused_moe{label}", fused_moe
                    if backward:  # every gradient a scheme gives: frozen quantized experts pass dx and dw only
                        trainable = scheme.weight is None

                        def grad(x=x, w=w, ids=ids, qa=qa, qb=qb, trainable=trainable):
                            needs = (True, trainable, trainable, trainable and bias, trainable and bias, True)
                            fused_experts_backward(torch.randn_like(x), x, qa, qb, w.float(), ids.to(torch.int32),
                                                   act, scheme, s13, s2, b13, b2, block, None, False,
                                                   act.alpha(None), act.limit(None), needs)

                        yield f"{name} {shape} {dtype} T={T} bwd", grad


def main(argv=None) -> int:
    from torch_moe_ops.schemes import QUANT_SCHEMES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=",".join(QUANT_SCHEMES))
    p.add_argument("--T", type=int, nargs="+", default=[1, 64, 4096])
    p.add_argument("--dtypes", default="bf16", help="activation dtypes: bf16, fp16, fp32 (comma list)")
    p.add_argument("--kernels", default="_moe_gemm_kernel",
                   help="kernel names to report (comma list; all: every one; none: compile only)")
    p.add_argument("--sass", type=Path, help="folder to write each reported kernel's SASS into")
    p.add_argument("--tiles", help="BMxBNxBK[xWARPSxSTAGES] for every GEMM instead of the GPU's configs")
    p.add_argument("--backward", action="store_true", help="also the gradients (dgrad, wgrad, their epilogues)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"layers, of {list(SHAPES)}")
    p.add_argument("--batch-invariant", action="store_true", help="the forward's batch-invariant tiles")
    args = p.parse_args(argv)
    try:
        _install(args.tiles)
        _probe()
    except Exception as exc:  # noqa: BLE001 - this Triton's internals differ: say so, apart from kernel failures
        print(f"cannot compile for sm_90a with triton {triton.__version__} here: {type(exc).__name__}: {exc}")
        return SETUP_FAILED
    failures = 0
    print(f"triton {triton.__version__}, target sm_90a ({DEVICE_NAME} tiles)")
    print(f"{'case':<34} {'kernel':<22} {'tiles':<18} {'regs':>4} {'spill':>5} {'smem':>6} {'HGMMA':>5} "
          f"{'QGMMA':>5} {'HMMA':>4} {'sass':>5} {'loop':>4}")
    for label, call in _cases(args.schemes.split(","), args.T, args.dtypes.split(","), args.backward,
                              args.shapes.split(","), args.batch_invariant):
        COMPILED.clear()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - report every failing case, keep going
            failures += 1
            print(f"{label:<34} FAILED: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        for i, (fn, kernel) in enumerate(COMPILED):
            name = fn.__name__
            if args.kernels != "all" and name not in args.kernels.split(","):
                continue
            c = kernel.src.constants if hasattr(kernel.src, "constants") else {}
            consts = {k[0] if isinstance(k, tuple) else k: v for k, v in dict(c).items()}
            names = fn.arg_names
            pick = lambda n: consts.get(names.index(n), consts.get(n, "?")) if n in names else "-"  # noqa: E731
            tiles = f"{pick('BLOCK_M')}x{pick('BLOCK_N')}x{pick('BLOCK_K')}"
            regs, spill = ptxas_report(kernel.asm["ptx"])
            sass = sass_of(kernel.asm["cubin"])
            s = sass_summary(sass)
            scratch = getattr(kernel.metadata, "global_scratch_size", 0)  # > 0: no direct / static launch
            print(f"{label:<34} {name[:22]:<22} {tiles:<18} {regs:>4} {spill:>5} {kernel.metadata.shared:>6} "
                  f"{s['hgmma']:>5} {s['qgmma']:>5} {s['hmma']:>4} {s['total']:>5} {s['loop']:>4}"
                  + (f" scratch {scratch}" if scratch else ""))
            if args.sass:
                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"{label.replace(' ', '_')}-{i}-{name}.sass").write_text(sass)  # i: launch order
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
