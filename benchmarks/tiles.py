"""Tile variants of a whole ``fused_moe`` call, for ``benchmarks.kernel_split --tiles`` and ``benchmarks/tune.py``'s
T = 1 tuning: a variant is GEMM1's and GEMM2's ``TileConfig`` at one token bucket, written as a tuned table of
this GPU into a folder of its own, which ``TORCH_MOE_OPS_TUNED_DIR`` then points at (its tables win over the
shipped ones; a fresh folder per variant, since the lookup caches per folder). The call under a variant runs the
package's real path (T = 1: pair rows, fused activation, fused sum), which tuning GEMMs one at a time does not.
"""
from __future__ import annotations

import contextlib
import json
import os

from benchmarks.shapes import MoEShape


def write_table(folder: str, device_name: str, shape: MoEShape, table_key: str, bucket: int, cfg1, cfg2) -> str:
    """``folder``/tiles.json: GEMM1 ([E, n1, H]) and GEMM2 ([E, H, I]) of ``shape`` take ``cfg1`` / ``cfg2`` at
    ``bucket`` on ``device_name``, under the scheme's ``table_key``. Returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    entries = [{"E": shape.E, "N": n, "K": k, "scheme": table_key, "configs": {str(bucket): c.to_dict()}}
               for (n, k), c in zip(((shape.n1, shape.H), (shape.H, shape.I)), (cfg1, cfg2))]
    with open(os.path.join(folder, "tiles.json"), "w") as f:
        json.dump({"device": device_name, "entries": entries}, f)
    return folder


@contextlib.contextmanager
def tuned_dir(folder: str | None):
    """Inside, the package reads its tile tables with ``folder``'s (None: the shipped ones alone); launch plans are
    cleared on the way in and out (a plan keeps the tiles it recorded)."""
    import torch_moe_ops as moe
    from torch_moe_ops._kernels.configs import TUNED_DIR_ENV

    before = os.environ.get(TUNED_DIR_ENV)
    _set(TUNED_DIR_ENV, folder)
    moe.clear_launch_plans()
    try:
        yield
    finally:
        _set(TUNED_DIR_ENV, before)
        moe.clear_launch_plans()


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
