"""benchmarks/report.py and benchmarks/plot.py on tiny synthetic runner JSONs: the tables, the peer fallback
and the figure (speed-up per model and peer, % of roofline; skipped without matplotlib)."""
import json

import pytest

from benchmarks import plot, report


def _cell(shape, scheme, T, provider, ms, **extra):
    return dict(shape=shape, scheme=scheme, T=T, provider=provider, ms=ms, roof_s=ms * 5e-4, frac_roof=0.5,
                tflops=7.0, **extra)


def _result(time, *, peers=True, device="Fake GPU"):
    cells = []
    for T in (1, 3, 17):
        cells.append(_cell("Tiny-MoE", "none", T, "ours", 0.1 * T,
                           **({"speedup_vs_grouped_mm": 1.5 + T, "speedup_vs_naive": 9.0} if peers else {})))
        cells.append(_cell("Odd-MoE", "int4_w4a16", T, "ours", 0.3 * T))
        if peers:
            cells.append(_cell("Tiny-MoE", "none", T, "grouped_mm", 0.1 * T * (1.5 + T)))
            cells.append(_cell("Tiny-MoE", "none", T, "naive", 0.9 * T))
    cells.append(dict(kind="quantize", shape="tiny-w13", dims=[3, 10, 6], scheme="fp8_channel", ms=0.25,
                      GBps=123.0, frac_copy=0.97))
    return dict(device=device, torch="2.13", time=time, command="run.py --tiny",
                ceilings=dict(copy_GBps=100.0, bf16_TFLOPs=10.0, fp8_TFLOPs=20.0), cells=cells)


def _write(path, result):
    path.write_text(json.dumps(result))
    return str(path)


def test_tables_rows_and_quantize_table():
    text = report.tables(_result("2026-01-01 00:00 UTC"))
    lines = text.splitlines()
    assert lines[0].startswith("| shape | scheme | T | roof ms | ours ms | grouped_mm ms | naive ms |")
    assert "| Tiny-MoE | none | 17 | 0.850 | 1.700 | 31.450 | 15.300 | 50% | 7 | 18.50x | — |" in lines
    assert "| Odd-MoE | int4_w4a16 | 3 | 0.450 | 0.900 | — | — | 50% | 7 | — | — |" in lines  # no bf16 row
    cells = [_cell("Q", "none", 1, "ours", 0.3), _cell("Q", "mxfp4", 1, "ours", 0.1)]
    text = report.tables(dict(cells=cells))
    assert "| Q | mxfp4 | 1 | 0.050 | 0.100 | 50% | 7 | — | 3.00x |" in text.splitlines()  # ours bf16 / ours
    assert "| tiny-w13 `[3, 10, 6]` | fp8_channel | 0.250 | 123 | 97% |" in lines


def test_speedups_and_roofline_series():
    r = _result("2026-01-01 00:00 UTC")
    assert plot.peer_names(r) == ["grouped_mm", "naive"]
    s = plot.speedups(r)
    assert sorted(s) == ["Tiny-MoE"]  # Odd-MoE has no peer
    assert sorted(s["Tiny-MoE"][("grouped_mm", "none")]) == [(1, 2.5), (3, 4.5), (17, 18.5)]
    assert sorted(plot.roofline(r)) == ["Odd-MoE", "Tiny-MoE"]
    assert plot.peer_names(_result("x", peers=False)) == []


def test_newest_with_peers_picks_latest_time(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "a.json", _result("2026-01-02 10:00 UTC", device="old"))
    _write(tmp_path / "sub" / "b.json", _result("2026-01-03 09:00 UTC", device="newest"))
    _write(tmp_path / "c.json", _result("2026-02-01 00:00 UTC", peers=False, device="ours only"))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a runner JSON: skipped
    path, result = plot.newest_with_peers(str(tmp_path))
    assert path.endswith("b.json") and result["device"] == "newest"
    assert plot.newest_with_peers(str(tmp_path / "sub" / "none")) is None


def test_main_writes_tables_and_png_with_peer_fallback(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    peers_dir = tmp_path / "results"
    peers_dir.mkdir()
    _write(peers_dir / "peers.json", _result("2026-01-02 10:00 UTC", device="Peer GPU"))
    latest = _write(tmp_path / "latest.json", _result("2026-03-01 00:00 UTC", peers=False, device="New GPU"))
    md, png = tmp_path / "t.md", tmp_path / "p.png"
    assert report.main([latest, "--md", str(md), "--png", str(png), "--peers-dir", str(peers_dir)]) == 0
    assert md.read_text().startswith("Device: New GPU, torch 2.13, measured 2026-03-01 00:00 UTC.")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-ups from peers.json (Peer GPU, 2026-01-02 10:00 UTC)" in capsys.readouterr().out


def test_figure_titles_series_and_styles():
    pytest.importorskip("matplotlib")
    peers = _result("2026-01-02 10:00 UTC", device="Peer GPU")
    fig = plot.figure(_result("2026-03-01 00:00 UTC", peers=False), "latest.json (New GPU)", peers, "peers.json")
    titles = [sf._suptitle.get_text() for sf in fig.subfigs]
    assert titles == ["speed-up of ours (fused_experts) over each peer: peers.json",
                      "ours (fused_experts), % of roofline: latest.json (New GPU)"]
    speed_ax = fig.subfigs[0].axes[0]
    lines = {ln.get_label(): ln for ln in speed_ax.get_lines() if not ln.get_label().startswith("_")}
    assert sorted(lines) == ["vs grouped_mm (none)", "vs naive (none)"]
    a, b = lines.values()
    assert (a.get_marker(), a.get_linestyle()) != (b.get_marker(), b.get_linestyle())  # not colour alone
    assert speed_ax.get_yscale() == "log" and speed_ax.get_legend() is not None
    assert [ax.get_title() for ax in fig.subfigs[1].axes if ax.get_visible()] == ["Tiny-MoE", "Odd-MoE"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_figure_without_ours_cells_is_an_error():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="empty.json: no 'ours' cells"):
        plot.figure(dict(cells=[]), "empty.json")


def test_tables_give_the_swapped_and_invariant_ratios_to_ours():
    from benchmarks import report

    times = (("ours", 2.0), ("ours_invariant", 2.6), ("ours_swapped", 1.8), ("ours_invariant_swapped", 2.1))
    cells = [dict(shape="Q", scheme="int4_w4a16", T=1, provider=p, ms=m) for p, m in times]
    head, _, row = report.tables(dict(cells=cells)).splitlines()
    assert head.endswith("| invariant / ours | swapped / ours | invariant swapped / ours |")
    assert row.endswith("| 1.300x | 0.900x | 1.050x |")
