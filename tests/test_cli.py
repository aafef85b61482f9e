"""The command line and the packaging facts a user meets first: --help, info, one-line errors, the version."""
import subprocess
import sys

import pytest
import torch

import torch_moe_ops


def _run(*args):
    return subprocess.run([sys.executable, "-m", "torch_moe_ops", *args], capture_output=True, text=True, timeout=300)


def test_help_names_every_subcommand():
    r = _run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "info" in r.stdout and "subcommands" in r.stdout


def test_info():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for key in ("torch-moe-ops", "torch", "device", "cpu backend", "TRITON_INTERPRET", "tuned tiles", "int4_w4a16"):
        assert key in r.stdout


@pytest.mark.parametrize("args,match", [
    (("demo", "--schemes", "fp8,none"), "unknown scheme(s) ['fp8']"),
    (("demo", "--quant", "int5"), "invalid choice: 'int5'"),
    (("demo", "--device", "tpu"), "invalid choice: 'tpu'"),
    (("nope",), "invalid choice: 'nope'"),
])
def test_bad_arguments_are_one_line_errors(args, match):
    r = _run(*args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_one_line_error():
    r = _run("demo", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA device is visible" in r.stderr and "Traceback" not in r.stderr


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    assert torch_moe_ops.__version__ == version("torch-moe-ops")


def test_tuned_summary_names_the_family_fallback():
    """An H200 has no table of its own: info says it takes its family's (the H100's) tiles."""
    pytest.importorskip("triton")
    from torch_moe_ops.__main__ import _tuned_summary

    assert "family sm90" in _tuned_summary("NVIDIA H200", (9, 0))
    assert _tuned_summary("NVIDIA H100 80GB HBM3", (9, 0)).endswith("for 'NVIDIA H100 80GB HBM3'")
    assert "heuristic" in _tuned_summary("NVIDIA A100", (8, 0))
