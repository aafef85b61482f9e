"""Counting Triton JIT variants, for the no-recompile-over-T tests."""
import pytest


def compiled_variants(kernel) -> int:
    """How many compiled variants ``kernel`` (a ``triton.JITFunction``) holds across devices."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("the JIT cache is not observable here (TRITON_INTERPRET=1 compiles nothing)")
    return sum(len(entry[0]) for entry in caches.values())
