"""Streaming per-expert loading state (docs/design.md §10): which pieces arrived, staging, rounds.

One ``ExpertStreamer`` per layer. It tracks which ``(param, expert, shard)`` pieces arrived in the
current round and, for quantized layers, holds full-precision staging for the projections that are
still waiting for a partner shard::

    gate (w1) ──┐ staging[e] [N1, H] ──(up (w3) arrives)──> quantize_weight_into(w13_weight[e], scale[e]) ─> free
    up   (w3) ──┘
    down (w2) ─────────────────────────────────────────────> quantize_weight_into(w2_weight[e], scale[e])

A projection is quantized the moment its last shard arrives (w2 needs only itself; w13 needs gate and up),
straight into its slot of the storage allocated at construction. With a checkpoint ordered by expert, at
most one expert's ``[N1, H]`` staging (plus one transient ``[H, I]`` copy) is alive at any time.

States: ``fresh`` (nothing loaded) -> ``loading`` -> ``loaded`` (after ``finalize``) -> ``reloading`` (a
later load call starts a round; it ends when a complete set has arrived, or at ``finalize``) -> ``loaded``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import LoadError

WEIGHTS = ("w13_weight", "w2_weight")
BIASES = ("w13_bias", "w2_bias")
CORRECTION = "e_score_correction_bias"
#: every parameter a checkpoint fills through the loader
LOADABLE = WEIGHTS + BIASES + (CORRECTION,)

Key = tuple  # (param name, local expert slot or None, shard id or None)


class ExpertStreamer:
    """Per-layer bookkeeping of the online-quantization lifecycle (see the module docstring)."""

    def __init__(self, required: frozenset, gated_w13: bool):
        self.required = required  #: every (param, expert, shard) the checkpoint must provide
        self.gated_w13 = gated_w13  #: w13 needs both w1 and w3 before it can be quantized
        self.state = "fresh"
        self.seen: set[Key] = set()  #: pieces received in the current round
        self.staging: dict[int, torch.Tensor] = {}  #: expert -> full-precision w13 staging [N1, H]
        self.staged: dict[int, set[str]] = {}  #: expert -> shards of w13 written into its staging
        self.staging_bytes = 0  #: bytes of staging alive now (w13 staging plus a transient w2 copy)
        self.peak_staging_bytes = 0  #: high-water mark of ``staging_bytes`` since construction
        self.rounds = 0  #: completed load/reload rounds

    # -- state ------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """True once a complete set was loaded and finalized (stays True while a reload round runs)."""
        return self.state in ("loaded", "reloading")

    def begin(self, keys: list[Key]) -> None:
        """Record incoming pieces; a piece seen twice in one round is an error. Starts a reload round
        when the layer is already loaded."""
        if self.state == "loaded":
            self.state, self.seen = "reloading", set()
        elif self.state == "fresh":
            self.state = "loading"
        for key in keys:
            if key in self.seen:
                what = "before finalize_loading" if self.state == "loading" else "in one reload round"
                raise LoadError(f"{describe(key)} was loaded twice {what}")
        self.seen.update(keys)

    def mark_loaded(self) -> None:
        """Every piece was set from outside the loader (``load_state_dict``): drop staging, state ``loaded``."""
        self.staging.clear()
        self.staged.clear()
        self.staging_bytes = 0
        self.state, self.seen = "loaded", set()
        self.rounds += 1

    def missing(self) -> list[Key]:
        return sorted(self.required - self.seen, key=_sort_key)

    def complete_round(self) -> bool:
        """End a reload round automatically once every piece arrived again. True when it ended."""
        if self.state == "reloading" and not self.staging and self.seen >= self.required:
            self.state, self.seen = "loaded", set()
            self.rounds += 1
            return True
        return False

    def finalize(self, *, strict_reload: bool = True) -> str:
        """Close the current round. Returns ``"loaded"``, ``"unchanged"`` (nothing arrived) or ``"reloaded"``.

        Raises ``LoadError`` (state unchanged, so the layer never looks loaded) when pieces are missing:
        all of them on a first load; on a reload, a half-staged projection always, others when strict."""
        if self.state == "loaded":
            return "unchanged"
        if self.state == "fresh":
            raise LoadError("received no weights")
        missing = self.missing()
        if self.state == "loading" and missing:
            raise LoadError(format_missing(missing))
        if self.state == "reloading":
            half = [(n, e, s) for (n, e, s) in missing if n == "w13_weight" and e in self.staged]
            if half or (strict_reload and missing):
                raise LoadError("reload incomplete: " + format_missing(half or missing))
        self.state, self.seen = "loaded", set()
        self.rounds += 1
        return "loaded" if self.rounds == 1 else "reloaded"

    # -- staging ----------------------------------------------------------------------------------
    def stage_w13(self, expert: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        buf = self.staging.get(expert)
        if buf is None:
            buf = self.staging[expert] = make()
            self.staged[expert] = set()
            self._grow(buf.numel() * buf.element_size())
        return buf

    def mark_w13(self, expert: int, shard: str) -> bool:
        """Note that ``shard`` is written into the expert's staging; True when w13 is now complete."""
        got = self.staged[expert]
        got.add(shard)
        return got >= ({"w1", "w3"} if self.gated_w13 else {"w1"})

    def release_w13(self, expert: int) -> None:
        buf = self.staging.pop(expert)
        self.staged.pop(expert)
        self.staging_bytes -= buf.numel() * buf.element_size()

    def transient(self, nbytes: int) -> None:
        """Account for a short-lived staging copy (alloc then free) in the peak."""
        self._grow(nbytes)
        self.staging_bytes -= nbytes

    def _grow(self, nbytes: int) -> None:
        self.staging_bytes += nbytes
        self.peak_staging_bytes = max(self.peak_staging_bytes, self.staging_bytes)


def required_keys(num_experts: int, gated: bool, has_bias: bool, correction_bias: bool) -> frozenset:
    """Every piece of one complete load of ``num_experts`` (local) experts."""
    w13_shards = ("w1", "w3") if gated else ("w1",)
    keys = set()
    for e in range(num_experts):
        keys.update(("w13_weight", e, s) for s in w13_shards)
        keys.add(("w2_weight", e, "w2"))
        if has_bias:
            keys.update(("w13_bias", e, s) for s in w13_shards)
            keys.add(("w2_bias", e, "w2"))
    if correction_bias:
        keys.add((CORRECTION, None, None))
    return frozenset(keys)


def _sort_key(key: Key):
    name, expert, shard = key
    return (expert if expert is not None else -1, name, shard or "")


def describe(key: Key) -> str:
    name, expert, shard = key
    return name if expert is None else f"{name} expert {expert} shard {shard!r}"


def format_missing(missing: list[Key]) -> str:
    """``3 missing: expert 0: w3 (w13_weight); expert 5: w2 (w2_weight), ...``"""
    by_expert: dict = {}
    for name, expert, shard in missing:
        by_expert.setdefault(expert, []).append(name if shard is None else f"{shard} ({name})")
    parts = [(", ".join(v) if e is None else f"expert {e}: " + ", ".join(v)) for e, v in by_expert.items()]
    return f"{len(missing)} missing: " + "; ".join(parts)
