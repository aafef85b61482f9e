"""The batch-invariant switch (docs/batch-invariance.md): one process-wide flag, a context manager around it.

The ops never read it: ``moe::fused_experts`` / ``moe::fused_moe`` take ``batch_invariant`` as an argument, so
a graph traced by ``torch.compile`` carries the value it was traced with. The readers are the Python callers
(the public wrappers when their ``batch_invariant`` is None, ``FusedMoE`` layers built with
``batch_invariant=None``, the transformers experts interface): code that Dynamo traces, which guards on this
module's global, so flipping the switch retraces instead of replaying a stale graph.
"""
from __future__ import annotations

import contextlib

_enabled = False


def is_batch_invariant() -> bool:
    """True while batch-invariant mode is on (``set_batch_invariant`` / ``with batch_invariant():``)."""
    return _enabled


def set_batch_invariant(enabled: bool = True) -> None:
    """Turn batch-invariant mode on or off for the whole process (every thread), like
    ``torch.use_deterministic_algorithms``. Under it each token's output row of ``fused_experts`` /
    ``fused_moe`` / ``FusedMoE`` is bitwise the same whatever else is in the batch (docs/batch-invariance.md)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_batch_invariant(enabled): enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """``with torch_moe_ops.batch_invariant():`` batch-invariant mode inside the block, the previous setting
    after it (also on an exception). Around a ``torch.compile``'d function (traced once for the mode) or inside one
    (Dynamo traces the switch's change, ``fullgraph=True`` included)."""
    prev = _enabled
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(prev)


def resolve(flag: bool | None) -> bool:
    """A ``batch_invariant`` argument: None follows the switch, a bool wins over it."""
    if flag is None:
        return _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"batch_invariant must be True, False or None (follow torch_moe_ops.batch_invariant()), "
                        f"got {flag!r}")
    return flag
