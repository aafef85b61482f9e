"""What the HF demo measures: peak memory while a model loads, and greedy generation speed.

Memory on CUDA is ``torch.cuda.max_memory_allocated`` over the load (exact). On CPU torch keeps no allocator
statistics, so it is the process's resident set: the peak (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs``) minus the resident set before the load, after handing freed heap back to the OS.
That counts every page the load touched, including the checkpoint's memory-mapped file pages, so it bounds
the load's own allocations from above. Where the peak cannot be reset it falls back to the resident set
after the load (a lower bound on the peak), and says so in its label.
"""
from __future__ import annotations

import ctypes
import gc
import time

import torch

_STATUS = "/proc/self/status"


def _status_bytes(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so the next peak starts clean
    except (OSError, AttributeError):
        pass


class LoadPeak:
    """``with LoadPeak(device) as m: load()`` -> ``m.bytes`` (None where nothing can be measured) and
    ``m.label`` (what the number is)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.label = ""

    def __enter__(self):
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _status_bytes("VmRSS")
            self._peak = self._base is not None and _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.label = "CUDA peak allocated during the load (torch.cuda.max_memory_allocated)"
        elif self._base is None:
            self.label = f"not measured ({_STATUS} unreadable)"
        elif self._peak:
            self.bytes = _status_bytes("VmHWM") - self._base
            self.label = ("process peak RSS during the load minus RSS before it (VmHWM - VmRSS; includes the "
                          "checkpoint's mmapped file pages)")
        else:
            self.bytes = _status_bytes("VmRSS") - self._base
            self.label = ("process RSS after the load minus before it (the peak could not be reset: a lower "
                          "bound on the load's peak)")
        return False


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding without a KV cache: every step runs the whole sequence (one compiled graph serves
    every length). prompt: [B, S] int64. Returns (ids [B, S + new_tokens] int64, seconds)."""
    ids = prompt
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits  # [B, S', V]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    _sync(prompt.device)
    return ids, time.perf_counter() - start
