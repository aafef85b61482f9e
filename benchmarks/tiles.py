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
    from torch_moe_ops._kernels.configs import TUNED_DIR_ENV

    with environment({TUNED_DIR_ENV: folder}):
        yield


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    """Inside, the environment variables ``values`` (None: unset), launch plans cleared on the way in and out (a plan
    keeps the switches it recorded); the previous values back afterwards."""
    import torch_moe_ops as moe

    before = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        _set(name, value)
    moe.clear_launch_plans()
    try:
        yield
    finally:
        for name, value in before.items():
            _set(name, value)
        moe.clear_launch_plans()


def parse_envs(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``"NAME=SWITCH=V[,SWITCH=V] ..."`` -> [(NAME, {TORCH_MOE_OPS_SWITCH: V, ...})]: the package's switches
    without their ``TORCH_MOE_OPS_`` prefix (README's table), e.g. ``"ahead0=LOAD_AHEAD=0 pdl=PDL=1"``."""
    out = []
    for item in spec.split():
        name, _, rest = item.partition("=")
        pairs = [kv.partition("=") for kv in rest.split(",") if kv]
        if not name or not pairs or any(not k or not sep for k, sep, _ in pairs):
            raise ValueError(f"env variant {item!r}: NAME=SWITCH=VALUE[,SWITCH=VALUE]")
        out.append((name, {f"TORCH_MOE_OPS_{k}": v for k, _, v in pairs}))
    return out


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
