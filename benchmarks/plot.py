"""``docs/performance.png`` from runner JSONs: the speed-up of ``ours`` (``fused_experts``) over each peer, one
panel per model, and ours' fraction of the roofline, one panel per model. Each row is titled with the JSON it
comes from (file, device, time). A run that timed ``ours`` only (no peer cells) gets its speed-up row from the
newest JSON that has peers (``newest_with_peers``). matplotlib (the ``[bench]`` extra) is imported lazily."""
from __future__ import annotations

import json
import os
from collections import defaultdict

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Okabe-Ito (colour-blind safe; the yellow is left out: too faint on white), one colour per scheme
_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_LINES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2))]


def _timed(result: dict) -> list:
    return [c for c in result["cells"] if "T" in c and "ms" in c]


def peer_names(result: dict) -> list:
    """Providers other than ours (``ours``, ``ours_fused_moe``) with a timed cell, sorted."""
    return sorted({c["provider"] for c in _timed(result) if not c["provider"].startswith("ours")})


def speedups(result: dict) -> dict:
    """{shape: {(peer, scheme): [(T, peer ms / ours ms)]}} from the runner's ``speedup_vs_<peer>`` fields."""
    out = defaultdict(lambda: defaultdict(list))
    for c in _timed(result):
        if c["provider"] != "ours":
            continue
        for key, ratio in c.items():
            if key.startswith("speedup_vs_"):
                out[c["shape"]][(key[len("speedup_vs_"):], c["scheme"])].append((c["T"], ratio))
    return out


def roofline(result: dict) -> dict:
    """{shape: {scheme: [(T, % of roofline)]}} of the ``ours`` cells."""
    out = defaultdict(lambda: defaultdict(list))
    for c in _timed(result):
        if c["provider"] == "ours" and "frac_roof" in c:
            out[c["shape"]][c["scheme"]].append((c["T"], 100 * c["frac_roof"]))
    return out


def newest_with_peers(folder: str = RESULTS_DIR):
    """(path, result) of the JSON under ``folder`` (recursively) that has peer cells and the latest ``time``
    (the runner writes "YYYY-MM-DD HH:MM UTC", which sorts as text); None if there is none."""
    best = None
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    result = json.load(f)
                if not isinstance(result, dict) or not peer_names(result):
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a runner JSON
            if best is None or result.get("time", "") > best[1].get("time", ""):
                best = (path, result)
    return best


def source_label(path: str, result: dict) -> str:
    """``benchmarks/results/x.json (NVIDIA H200, 2026-12-01 21:20 UTC)``; paths outside the repo by name."""
    full = os.path.abspath(path)
    shown = os.path.relpath(full, _REPO) if full.startswith(_REPO + os.sep) else os.path.basename(full)
    return f"{shown} ({result.get('device', '?')}, {result.get('time', '?')})"


def _style(i: int) -> dict:
    return dict(color=_COLOURS[i % len(_COLOURS)], marker=_MARKERS[i % len(_MARKERS)],
                linestyle=_LINES[i % len(_LINES)], markersize=4, linewidth=1.4)


def _series_panel(ax, series: dict, styles: dict, label) -> None:
    from matplotlib.ticker import FuncFormatter

    for key in series:
        pts = sorted(series[key])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label(key), **styles[key])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("tokens T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="best")


def figure(result: dict, source: str, peers_result: dict | None = None, peers_source: str | None = None):
    """The matplotlib Figure: row 1 speed-up vs each peer (from ``peers_result``, default ``result``), row 2
    % of roofline (from ``result``). ``source`` / ``peers_source``: the rows' provenance, shown in their titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if peers_result is None:
        peers_result, peers_source = result, source
    speed, roof = speedups(peers_result), roofline(result)
    rows = [r for r in (speed, roof) if r]
    if not rows:
        raise ValueError(f"{source}: no 'ours' cells to plot")
    ncols = max(len(r) for r in rows)
    fig = plt.figure(figsize=(4.2 * ncols, 3.9 * len(rows)), layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    # a scheme keeps its colour in both rows, in the runner's order (none first)
    schemes = list(dict.fromkeys([k[1] for s in speed.values() for k in s] + [k for s in roof.values() for k in s]))
    colour = {s: i for i, s in enumerate(schemes)}
    peers = sorted({k[0] for s in speed.values() for k in s})
    sub = iter(subfigs)
    if speed:
        sf = next(sub)
        sf.suptitle(f"speed-up of ours (fused_experts) over each peer: {peers_source}", fontsize=9)
        axes = sf.subplots(1, ncols, squeeze=False)[0]
        for ax, (shape, series) in zip(axes, speed.items()):
            styles = {k: {**_style(colour[k[1]]), "marker": _MARKERS[peers.index(k[0]) % len(_MARKERS)],
                          "linestyle": _LINES[peers.index(k[0]) % len(_LINES)]} for k in series}
            _series_panel(ax, series, styles, lambda k: f"vs {k[0]} ({k[1]})")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 7.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.axhline(1.0, color="0.4", linewidth=0.8)
            ax.set_ylabel("peer ms / ours ms (> 1: ours faster)")
            ax.set_title(shape, fontsize=9)
        for ax in axes[len(speed):]:
            ax.set_visible(False)
    if roof:
        sf = next(sub)
        sf.suptitle(f"ours (fused_experts), % of roofline: {source}", fontsize=9)
        axes = sf.subplots(1, ncols, squeeze=False)[0]
        for ax, (shape, series) in zip(axes, roof.items()):
            _series_panel(ax, series, {k: _style(colour[k]) for k in series}, str)
            ax.set_ylim(0, 105)
            ax.set_ylabel("% of roofline")
            ax.set_title(shape, fontsize=9)
        for ax in axes[len(roof):]:
            ax.set_visible(False)
    return fig


def plot(result: dict, path: str, source: str, *, peers: str | None = "auto", peers_dir: str = RESULTS_DIR) -> str:
    """Write the PNG; returns the provenance of the speed-up row. ``peers``: "auto" (``result`` if it has peers,
    else ``newest_with_peers(peers_dir)``), a JSON path, or None (no speed-up row unless ``result`` has peers)."""
    peers_result, peers_source = None, source
    if peers and peers != "auto":
        with open(peers) as f:
            peers_result = json.load(f)
        peers_source = source_label(peers, peers_result)
    elif peers == "auto" and not peer_names(result):
        found = newest_with_peers(peers_dir)
        if found is not None:
            peers_result, peers_source = found[1], source_label(*found)
    fig = figure(result, source, peers_result, peers_source)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return peers_source
