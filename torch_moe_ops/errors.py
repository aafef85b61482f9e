"""Exceptions shared across the package (ground floor: imports nothing of ``torch_moe_ops``)."""
from __future__ import annotations


class LoadError(RuntimeError):
    """A load is incomplete or inconsistent (missing pieces, a piece loaded twice, a wrong state, a corrupt
    checkpoint file)."""


class TornWeightsError(LoadError):
    """A reload failed after it had written part of its weights: the layer holds a mix of old and new
    experts, so its forward refuses to run until a later complete reload succeeds
    (docs/online-quantization.md, "Failed loads")."""


__all__ = ["LoadError", "TornWeightsError"]
