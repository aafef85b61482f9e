"""What a benchmark ran on, for ``host.py`` and ``e2e.py``: the device (and its short name ``h100`` / ``h200``
for the results folder), torch / triton / transformers versions, the commit and the date; ``env.txt``; and the
two scripts' small shared helpers (JSON written after every row, a timestamped log, comma-separated options)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_short_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H200`` -> ``h200``; another GPU: its first model-like
    word, lower case (``NVIDIA A100-SXM4-80GB`` -> ``a100``); ``cpu`` for the CPU."""
    if device_name == "cpu":
        return "cpu"
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device_name.upper())
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: reported as missing
        return None
    return getattr(mod, "__version__", "?")


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", _REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: str | torch.device = "cuda") -> dict:
    """Facts about this run: device (name, short name, capability), versions, commit, UTC time, command."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = "sm_" + "".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = "cpu", platform.processor() or platform.machine()
    return {"device": name, "gpu": gpu_short_name(name), "capability": cap, "torch": torch.__version__,
            "triton": _version("triton"), "transformers": _version("transformers"),
            "torch_moe_ops": _version("torch_moe_ops"), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "commit": _commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}


def write_env(out_dir: str, info: dict, name: str = "env.txt") -> str:
    """``out_dir/<name>``: one ``key: value`` line per fact (appended to by each script, so a folder
    written by host.py then e2e.py names both commands)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "a") as f:
        f.write("".join(f"{k}: {v}\n" for k, v in info.items()) + "\n")
    return path


def write_json(path: str, env: dict, rows: list, **extra) -> None:
    """The result file: ``{"env": ..., **extra, "rows": [...]}`` (rewritten after every row, so a run cut
    short still leaves what it measured)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, **extra, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def csv_arg(kind=str, choices=None):
    """argparse type: ``"a,b"`` -> [kind(a), kind(b)], each in ``choices`` when given."""
    def parse(text):
        items = [kind(s) for s in text.split(",") if s]
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from "
                                             f"{', '.join(map(str, choices or []))}")
        return items
    return parse


class Log:
    """``log(msg)``: one line with the seconds since the start, flushed (progress in a device log)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)
