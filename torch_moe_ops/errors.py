"""Exceptions shared across the package (ground floor: imports nothing of ``torch_moe_ops``)."""
from __future__ import annotations


class LoadError(RuntimeError):
    """A load is incomplete or inconsistent (missing pieces, a piece loaded twice, a wrong state)."""


__all__ = ["LoadError"]
