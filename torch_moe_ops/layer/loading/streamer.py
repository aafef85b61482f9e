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

Pre-quantized fp8 pieces (a weight already in e4m3 and its scale) are not quantized: a weight piece also
records ``(PREQUANTIZED, expert, shard)``, which makes that expert's scale pieces required in the round
(``with_scales``), and one expert's weights come in one format per round (``mixed_formats``). On a first load
they are written straight into their slots; in a reload they are held (``hold``) until every weight and
scale piece of their projection arrived, so forward never sees a new weight with an old scale.

States: ``fresh`` (nothing loaded) -> ``loading`` -> ``loaded`` (after ``finalize``) -> ``reloading`` (a
later load call starts a round; it ends when a complete set has arrived, or at ``finalize``) -> ``loaded``.
A reload that fails after it wrote something (a stream that broke midway, a failed ``finalize``) ``tear``s
the layer: its round is dropped, ``failed`` names the failure and the layer is ``torn``; ``ready`` stays
False (forward refuses) until a later round delivers a complete set. A first load that fails the same way
starts over (``fresh``), so the whole source can simply be sent again.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

from ...errors import LoadError, TornWeightsError
from .keys import (BIASES, CORRECTION, LOADABLE, PREQUANTIZED, SCALES, WEIGHTS, Key, describe, expert_keys,
                   format_missing, mixed_formats, prequantized_experts, projection, required_keys, scale_key,
                   sort_key, with_scales)

__all__ = ["BIASES", "CORRECTION", "LOADABLE", "PREQUANTIZED", "SCALES", "WEIGHTS", "ExpertStreamer", "describe",
           "format_missing", "required_keys"]


class ExpertStreamer:
    """Per-layer bookkeeping of the online-quantization lifecycle (see the module docstring).

    required: every (param, expert, shard) of one complete load. gated_w13: w13 needs both w1 and w3.
    stages_w13: w13 shards wait in staging for their partner (quantized layers), so a half w13 cannot be
    written; unquantized layers copy each shard straight into place."""

    def __init__(self, required: frozenset, gated_w13: bool, stages_w13: bool = True):
        self.required = required  #: every (param, expert, shard) the checkpoint must provide
        self.gated_w13 = gated_w13  #: w13 needs both w1 and w3 before it can be quantized
        self.stages_w13 = stages_w13
        self.state = "fresh"
        self.failed: str | None = None  #: why the last round failed after writing (None: it did not)
        self.ready = False  #: forward may run; a plain attribute, so torch.compile guards on it (no sync)
        self.seen: set[Key] = set()  #: pieces received in the current round
        self.staging: dict[int, torch.Tensor] = {}  #: expert -> full-precision w13 staging [N1, H]
        self.staged: dict[int, set[str]] = {}  #: expert -> shards of w13 written into its staging
        #: (expert, "w13" | "w2") -> pre-quantized writes ``(nbytes, apply)`` held until the projection is complete
        self.held: dict[tuple[int, str], list] = {}
        #: (expert, projection) -> its weight keys (the scale keys follow from them)
        self._projection_keys: dict[tuple[int, str], set] = {}
        for key in required:
            if key[0] in WEIGHTS:
                self._projection_keys.setdefault(projection(key), set()).add(key)
        self.staging_bytes = 0  #: bytes of staging alive now (w13 staging plus a transient w2 copy)
        self.peak_staging_bytes = 0  #: high-water mark of ``staging_bytes`` since construction
        self.rounds = 0  #: completed load/reload rounds

    # -- state ------------------------------------------------------------------------------------
    def _set(self, state: str, *, healed: bool = False) -> None:
        self.state = state
        if healed:
            self.failed = None
        self.ready = state in ("loaded", "reloading") and not self.torn

    @property
    def torn(self) -> bool:
        """A complete set was loaded once, and a later round failed after writing: old and new weights mix."""
        return self.failed is not None and self.rounds > 0

    @property
    def loaded(self) -> bool:
        """True while a complete, untorn set is in place (also while a reload round runs)."""
        return self.ready

    @property
    def status(self) -> str:
        """``state``, or ``"torn"`` while the weights are torn (also while a healing round runs)."""
        return "torn" if self.torn else self.state

    def round_seen(self) -> set[Key]:
        """Pieces the next load call's round already holds (a new round starts from nothing)."""
        return set() if self.state in ("fresh", "loaded") else self.seen

    def check_new(self, keys) -> None:
        """Raise ``LoadError`` when a piece of ``keys`` is already in the round, or when they would mix float and
        pre-quantized weights of one expert in it (changes nothing)."""
        seen = self.round_seen()
        for key in keys:
            if key in seen:
                what = "in one reload round" if self.rounds else "before finalize_loading"
                raise LoadError(f"{describe(key)} was loaded twice {what}")
        new = set(keys)  # only the experts these keys touch: a stream checks each call in O(1)
        mixed = mixed_formats(new.union(*(expert_keys(seen, e) for e in {k[1] for k in new if projection(k)})))
        if mixed is not None:
            raise LoadError(mixed)

    def start(self) -> None:
        """A write is about to happen: start the round (``fresh`` -> ``loading``, ``loaded`` -> ``reloading``)."""
        if self.state == "loaded":
            self.seen = set()
            self._set("reloading")
        elif self.state == "fresh":
            self._set("loading")

    def record(self, keys) -> None:
        """Pieces that were written (only after their write succeeded)."""
        self.seen.update(keys)

    def tear(self, reason: str) -> None:
        """A round failed after writing: drop it (seen pieces and staging). With a complete set loaded before,
        the layer is torn until a complete round; a first load starts over from ``fresh``."""
        self._drop_staging()
        self.seen = set()
        self.failed = reason
        self._set("loaded" if self.rounds else "fresh")

    def mark_loaded(self) -> None:
        """Every piece was set from outside the loader (``load_state_dict``): drop staging, state ``loaded``."""
        self._drop_staging()
        self.seen = set()
        self.rounds += 1
        self._set("loaded", healed=True)

    def missing(self) -> list[Key]:
        return sorted(with_scales(self.required, self.seen) - self.seen, key=sort_key)

    def complete_round(self) -> bool:
        """End a reload round automatically once every piece arrived again (heals a torn layer). True when it
        ended."""
        if (self.state == "reloading" and not self.staging and not self.held
                and self.seen >= with_scales(self.required, self.seen)):
            self.seen = set()
            self.rounds += 1
            self._set("loaded", healed=True)
            return True
        return False

    def reload_problem(self, keys=(), *, strict: bool = True) -> str | None:
        """What ``finalize`` would refuse if the round ended holding its pieces plus ``keys`` (None: fine). Any
        round: float and pre-quantized weights of one expert mixed (``keys`` may map each key to the checkpoint
        tensor that gives it, for the message). A reload: a torn layer needs every piece; a half-staged w13 or
        a half pre-quantized projection is refused even when not strict."""
        seen = self.round_seen()
        named = {**dict.fromkeys(seen), **(keys if isinstance(keys, Mapping) else dict.fromkeys(keys))}
        mixed = mixed_formats(named)
        if mixed is not None or not self.rounds:
            return mixed
        got = seen | set(keys)
        missing = sorted(with_scales(self.required, got) - got, key=sort_key)
        if not missing:
            return None
        if self.torn:
            return "reload incomplete (a torn layer heals only with a complete set): " + format_missing(missing)
        started, pre = {projection(k) for k in got} - {None}, prequantized_experts(got)
        half = [k for k in missing if projection(k) in started
                and (k[1] in pre or (self.stages_w13 and k[0] == "w13_weight"))]
        if half or strict:
            return "reload incomplete: " + format_missing(half or missing)
        return None

    def torn_message(self) -> str:
        return (f"weights are torn: {self.failed}; forward refuses until a later reload delivers a complete set "
                "(reload_weights, or load_checkpoint + finalize_loading)")

    def finalize(self, *, strict_reload: bool = True) -> str:
        """Close the current round. Returns ``"loaded"``, ``"unchanged"`` (nothing arrived) or ``"reloaded"``.

        Raises ``LoadError`` when pieces are missing. A first load keeps its state (the layer never looks
        loaded; the missing pieces may still arrive). A reload round that cannot close (a half-staged
        projection always, other pieces when strict) tears the layer; a torn layer raises
        ``TornWeightsError`` until a complete round arrives."""
        if self.state == "fresh":
            raise LoadError("received no weights" + (f" (the last load failed: {self.failed})" if self.failed else ""))
        if self.state == "loading":
            missing = self.missing()
            if missing:
                raise LoadError(format_missing(missing))
        elif self.state == "loaded":
            if self.torn:
                raise TornWeightsError(self.torn_message())
            return "unchanged"
        else:  # reloading
            problem = self.reload_problem(strict=strict_reload)
            if problem is not None:
                self.tear(f"reload round {self.rounds + 1} failed at finalize_loading: {problem}")
                raise TornWeightsError(f"{problem}; {self.torn_message()}")
        self.seen = set()
        self.rounds += 1
        self._set("loaded", healed=True)
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

    def _drop_staging(self) -> None:
        self.staging.clear()
        self.staged.clear()
        self.held.clear()
        self.staging_bytes = 0

    def hold(self, expert: int, proj: str, nbytes: int, apply: Callable[..., None]) -> None:
        """Keep a pre-quantized write (``apply``, holding ``nbytes`` of copied data) until projection ``proj`` of
        ``expert`` is complete (``release``)."""
        self.held.setdefault((expert, proj), []).append((nbytes, apply))
        self._grow(nbytes)

    def release(self, expert: int, proj: str) -> list:
        """The held writes of projection ``proj`` (``"w13"`` | ``"w2"``) of ``expert`` once every weight and scale
        piece of it is in the round (taken off the streamer: the caller applies them), else nothing."""
        need = self._projection_keys.get((expert, proj), set())
        if (expert, proj) not in self.held or not (need | {scale_key(k) for k in need}) <= self.seen:
            return []
        held = self.held.pop((expert, proj))
        self.staging_bytes -= sum(n for n, _ in held)
        return [apply for _, apply in held]

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
