"""Every kernel of the forward and the backward compiles for the GPU (sm_90a), here on a CPU machine:
``tools/sm90_compile.py`` in a subprocess (it patches Triton's launcher), one layer shape, decode and
prefill tiles, every scheme. The interpreter runs constructs the GPU compiler rejects; this catches them
before a GPU session does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                    reason="this Triton has no NVIDIA backend with ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_compile.py"), "--T", "1", "4096", "--backward",
                          "--shapes", "qwen3", "--kernels", "none"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    if run.returncode == 3:  # the tool cannot drive this Triton without a GPU (its internals changed)
        pytest.skip(run.stdout.strip()[-500:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "FAILED" not in run.stdout


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                    reason="this Triton has no NVIDIA backend with ptxas")
def test_opt_in_kernel_switches_compile_for_sm90():
    """The opt-in GEMM forms (docs/kernels.md): swapped operands (with the batch-invariant tiles that widen
    BLOCK_N) for the weight-converting schemes, and GEMM1's fused activation, at decode and prefill tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TORCH_MOE_OPS_SWAP_AB="1", TORCH_MOE_OPS_FUSE_ACTIVATION="1")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_compile.py"), "--T", "1", "4096",
                          "--shapes", "qwen3", "--schemes", "int8_w8a16,int4_w4a16,mxfp4", "--batch-invariant",
                          "--kernels", "none"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip()[-500:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "FAILED" not in run.stdout
