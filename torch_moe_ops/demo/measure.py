"""What the HF demo measures: peak memory while a model loads, and greedy decoding speed of ``model.generate``
(KV cache, steady state; also used by ``benchmarks/e2e.py``).

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


def generation_setup(model, compiled: bool, *, backend: str = "inductor", fullgraph: bool = True,
                     dynamic: bool | None = False, mode: str = "default") -> None:
    """Set ``model.generation_config`` for greedy decoding the way transformers users do it.

    eager: the default ``DynamicCache``, no compilation (``disable_compile``). compiled: transformers' own
    compile path for its version (5.x): ``cache_implementation="static"`` and ``compile_config=CompileConfig(
    fullgraph, dynamic, backend, mode="default")``; ``generate`` then runs the prefill eagerly and every decode
    step through ``torch.compile(model.__call__)`` (``PreTrainedModel.get_compiled_call``). ``mode="default"``,
    not the CompileConfig default ``"reduce-overhead"`` (CUDA graphs), which crashed with the static cache for
    every experts implementation in the project's baselines; ``mode="reduce-overhead"`` asks for it (the
    benchmark's ``graphs`` rows). On a CPU model transformers compiles only with the private
    ``_compile_all_devices`` flag, which is set here."""
    from transformers import CompileConfig

    gc = model.generation_config
    gc.do_sample = False
    gc.eos_token_id = None  # random weights: never stop early, every call makes exactly max_new_tokens tokens
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    if not compiled:
        gc.cache_implementation, gc.compile_config, gc.disable_compile = None, None, True
        return
    cc = CompileConfig(fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode)
    if model.device.type == "cpu":
        cc._compile_all_devices = True
    gc.cache_implementation, gc.compile_config, gc.disable_compile = "static", cc, False
    for attr in ("_compiled_call", "_last_compile_config"):  # a fresh torch.compile per setup
        if hasattr(model, attr):
            delattr(model, attr)


def generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """``model.generate`` (greedy, KV cache, ``generation_setup``'s config) of exactly ``new_tokens`` tokens
    after ``prompt`` [B, S]; returns (ids [B, S + new_tokens], seconds, synchronized on CUDA)."""
    _sync(prompt.device)
    start = time.perf_counter()
    ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    _sync(prompt.device)
    seconds = time.perf_counter() - start
    if ids.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {ids.shape[1] - prompt.shape[1]} tokens, asked for {new_tokens}")
    return ids, seconds


def decode_rate(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 1) -> tuple[torch.Tensor, float]:
    """Steady-state decode time per step of ``model.generate``: (t(S + n) - t(S + 1)) / (n - 1), each t the
    fastest of ``repeats`` calls. Both calls run the same prefill, the same setup and the same first token
    (which comes out of the prefill), so the difference is n - 1 decode steps alone: compile and warm-up must
    be done before (``warm_up``). Returns (ids of the n-token call [B, S + n], seconds per decode step; the
    decode rate is B / that tokens/s)."""
    if new_tokens < 2:
        raise ValueError(f"decode_rate needs new_tokens >= 2, got {new_tokens}")
    ids, t_n = None, float("inf")
    for _ in range(max(repeats, 1)):
        out, t = generate(model, prompt, new_tokens)
        ids, t_n = (out, t) if t < t_n else (ids, t_n)
    t_1 = min(generate(model, prompt, 1)[1] for _ in range(max(repeats, 1)))
    return ids, max(t_n - t_1, 1e-9) / (new_tokens - 1)


def warm_up(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """One ``generate`` of ``new_tokens`` (the longest the timing asks for: a static cache is sized by the
    first, longest call and reused by the shorter ones, so nothing recompiles), then a short one; returns the
    seconds of the first call (with a compiled config: tracing and compiling the decode step included)."""
    _, first = generate(model, prompt, new_tokens)
    generate(model, prompt, min(2, new_tokens))
    return first
