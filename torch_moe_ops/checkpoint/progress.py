"""Progress bars of checkpoint loading: they count bytes (docs/online-quantization.md, "Progress").

A bar stays on screen when it ends (a log keeps the line). Written to a non-TTY stream (a log file, CI),
tqdm cannot redraw in place and appends every refresh, so the refresh interval there is long.
"""
from __future__ import annotations

import sys
from typing import Iterator

from .sources import tensor_nbytes

#: seconds between refreshes when stderr is not a terminal (each one is appended to the log)
NON_TTY_INTERVAL = 15.0


def progress_bar(desc: str, total: int | None, enabled: bool):
    """A tqdm bar of ``total`` bytes (None: unknown) on stderr; a disabled one prints nothing."""
    from tqdm.auto import tqdm

    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                file=stream, mininterval=0.1 if tty else NON_TTY_INTERVAL, leave=True)


def counted(items, bar) -> Iterator:
    """``items`` (``(name, tensor, origin)``) unchanged, adding each tensor's bytes to ``bar`` once the
    consumer is done with it."""
    for item in items:
        yield item
        bar.update(tensor_nbytes(item[1]))
