"""Progress bars of load_checkpoint / reload_weights count bytes and work in a non-TTY log (issue 16).

pytest's capsys stands in for a log: its stderr is not a terminal."""
import re
import sys

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint, reload_weights
from torch_moe_ops.checkpoint.progress import NON_TTY_INTERVAL, progress_bar

from tests.moe_models import MoEModel, hf_checkpoint

L, E, K, H, I = 2, 6, 2, 40, 24


def _nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _final_line(err: str, desc: str) -> str:
    """The last refresh of the bar ``desc`` (tqdm separates refreshes with carriage returns)."""
    return [part for part in re.split(r"[\r\n]", err) if part.startswith(desc)][-1]


def test_loading_bar_counts_bytes_and_stays(capsys):
    sd = hf_checkpoint(L, E, H, I)
    model = MoEModel(L, E, K, H, I)
    load_checkpoint(model, sd, progress=True)
    err = capsys.readouterr().err
    assert not sys.stderr.isatty()
    line = _final_line(err, "Loading weights")
    total = tqdm.format_sizeof(_nbytes(sd))
    assert f"{total}/{total}" in line and "100%" in line and "B/s" in line, line
    assert err.endswith("\n")  # left on screen (leave=True), the line closed
    assert err.count("Loading weights") <= 3  # a log gets the first and the last refresh, not a flood
    finalize_loading(model)


def test_folder_check_and_load_bars_use_the_header_byte_count(tmp_path, capsys):
    sd = {k: v.to(torch.bfloat16) for k, v in hf_checkpoint(L, E, H, I).items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = MoEModel(L, E, K, H, I)
    load_checkpoint(model, str(tmp_path), progress=True)
    err = capsys.readouterr().err
    total = tqdm.format_sizeof(_nbytes(sd))
    for desc in ("Checking weights", "Loading weights"):
        assert f"{total}/{total}" in _final_line(err, desc)


def test_generator_bar_counts_bytes_without_a_total(capsys):
    sd = hf_checkpoint(L, E, H, I)
    model = MoEModel(L, E, K, H, I)
    load_checkpoint(model, ((k, v) for k, v in sd.items()), progress=True)
    line = _final_line(capsys.readouterr().err, "Loading weights")
    assert line.startswith(f"Loading weights: {tqdm.format_sizeof(_nbytes(sd))}B"), line


def test_progress_false_prints_nothing_and_reload_shows_one_when_asked(capsys):
    sd = hf_checkpoint(L, E, H, I)
    model = MoEModel(L, E, K, H, I)
    load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    reload_weights(model, sd)  # progress defaults to False for RL syncs
    assert capsys.readouterr().err == ""
    reload_weights(model, sd, progress=True)
    total = tqdm.format_sizeof(_nbytes(sd))
    assert f"{total}/{total}" in _final_line(capsys.readouterr().err, "Loading weights")


def test_non_tty_refresh_interval(capsys):
    bar = progress_bar("x", 10, True)
    assert bar.mininterval == NON_TTY_INTERVAL >= 5 and bar.leave
    bar.close()
    assert progress_bar("x", 10, False).disable
