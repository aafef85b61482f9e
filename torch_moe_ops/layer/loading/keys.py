"""Load pieces as keys (docs/design.md §10, §11): ``(param name, local expert slot or None, shard id or None)``.

A round of loading is a set of keys; every rule about which pieces make a complete set lives here as
plain functions of such sets, so the streamer, the loader and a checkpoint's check pass (the keys a whole
source gives) decide alike. A pre-quantized fp8 weight piece adds the marker ``(PREQUANTIZED, expert,
shard)``: a set of keys then tells which experts arrive pre-quantized (their scales are required too) and
whether one mixes formats.
"""
from __future__ import annotations

from collections.abc import Mapping

WEIGHTS = ("w13_weight", "w2_weight")
SCALES = ("w13_weight_scale", "w2_weight_scale")  #: pre-quantized checkpoints' weight scales
BIASES = ("w13_bias", "w2_bias")
CORRECTION = "e_score_correction_bias"
#: every parameter a checkpoint fills through the loader
LOADABLE = WEIGHTS + SCALES + BIASES + (CORRECTION,)
#: the marker key name of a pre-quantized weight piece: ``(PREQUANTIZED, expert, shard)``
PREQUANTIZED = "fp8"

Key = tuple  # (param name, local expert slot or None, shard id or None)


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


def scale_key(key: Key) -> Key:
    name, expert, shard = key
    return (name + "_scale", expert, shard)


def projection(key: Key) -> tuple | None:
    """``(expert, "w13" | "w2")`` of a weight, scale or marker key; None for biases and the correction bias."""
    name, expert, shard = key
    if name == PREQUANTIZED:
        return (expert, "w2" if shard == "w2" else "w13")
    return (expert, name.split("_")[0]) if name in WEIGHTS or name in SCALES else None


def prequantized_experts(keys) -> set:
    """Experts that ``keys`` give pre-quantized (a marker or a scale key)."""
    return {e for (n, e, _) in keys if n == PREQUANTIZED or n in SCALES}


def with_scales(required: frozenset, keys) -> frozenset:
    """``required`` plus the scale keys of every weight of the experts that ``keys`` give pre-quantized."""
    experts = prequantized_experts(keys)
    if not experts:
        return required
    return required | {scale_key(k) for k in required if k[0] in WEIGHTS and k[1] in experts}


def mixed_formats(keys) -> str | None:
    """Why ``keys`` (a collection, or a mapping key -> checkpoint tensor name) mix float and pre-quantized
    weights of one expert, or None. A float weight cannot share a round with fp8 pieces of its expert: its
    scales would come from two sources (online quantization and the checkpoint)."""
    present = set(keys)
    pre = prequantized_experts(present)
    floats = sorted(k for k in present if k[0] in WEIGHTS and k[1] in pre and (PREQUANTIZED, k[1], k[2]) not in present)
    if not floats:
        return None
    e, names = floats[0][1], keys if isinstance(keys, Mapping) else {}
    fp8 = min((k for k in present if k[1] == e and (k[0] == PREQUANTIZED or k[0] in SCALES)), key=sort_key)
    return (f"expert {e} mixes formats in one round: {_text(fp8, names)} is pre-quantized fp8 but "
            f"{_text(floats[0], names)} is full precision; load each expert's weights in one format")


def expert_keys(keys, expert: int) -> set:
    """The weight, scale and marker keys of ``expert`` in ``keys`` (set lookups only: no scan of ``keys``)."""
    return {k for k in ((n, expert, s) for n in (*WEIGHTS, *SCALES, PREQUANTIZED) for s in ("w1", "w3", "w2"))
            if k in keys}


def _text(key: Key, names: Mapping) -> str:
    if names.get(key):  # a description (``checkpoint tensor 'name' (file)``) or a bare name
        text = names[key]
        return text if text.startswith("checkpoint tensor") else f"checkpoint tensor {text!r}"
    name, _, shard = key
    return f"the {shard} " + ("scale" if name in SCALES else "weight")


def sort_key(key: Key):
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
