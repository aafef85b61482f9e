"""Multi-process tests of ``FusedMoE(parallel=ParallelConfig(...))`` on CPU with gloo (world sizes 2 and 4).

Each world size is one launch of N worker processes (``_worker.py``) running every case; the processes
and every collective have hard timeouts, so a failure never hangs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from . import _worker

WORKER = os.path.join(os.path.dirname(__file__), "_worker.py")
LAUNCH_TIMEOUT = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, suite: str, outdir, timeout: float = LAUNCH_TIMEOUT) -> tuple[list[dict], list[int], str]:
    """Run ``world`` ranks; kill them all at ``timeout``. Returns per-rank results, exit codes and logs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = _free_port()
    logs = [open(os.path.join(outdir, f"{suite.split(':')[0]}-log{r}.txt"), "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), suite, str(outdir)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(world)]
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        codes = [p.returncode for p in procs]
        codes.append("timeout")
    text = ""
    for r, f in enumerate(logs):
        f.seek(0)
        text += f"--- rank {r} ---\n" + f.read()[-3000:]
        f.close()
    results = []
    for r in range(world):
        path = os.path.join(outdir, f"{suite}-rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results, codes, text


def _write_checkpoints(outdir, world):
    from safetensors.torch import save_file

    _worker.set_world(world)
    I = _worker.inter(world)
    for name, seed in (("a", 0), ("b", 1)):
        save_file(_worker.checkpoint(I, seed), os.path.join(outdir, f"ckpt_{name}_{world}.safetensors"))


@pytest.mark.parametrize("world", [2, 4])
def test_world(tmp_path, world):
    """Every case of ``_worker.cases(world)`` (TP, EP all-to-all / all-gather with and without 2 redundant
    experts, bf16 and fp8_block, subsets with int4 group 32 and mxfp4, T in {1, 5, 64}, skewed routing leaving ranks without tokens; loading and
    reload from safetensors; rebalance; compile) on ``world`` ranks, compared with the single-process layer."""
    _write_checkpoints(tmp_path, world)
    results, codes, logs = launch(world, "main", tmp_path)
    _worker.set_world(world)
    names = _worker.case_names(world)
    bad = {}
    for r, res in enumerate(results):
        for case in names:
            got = res.get(case, "not run (a rank died or timed out)")
            if got != "ok":
                bad.setdefault(case, []).append(f"rank {r}: {got}")
    assert not bad and codes == [0] * world, (
        f"world {world}: {len(bad)} of {len(names)} cases failed: {sorted(bad)}\n"
        + "\n".join(f"== {c}\n" + "\n".join(v) for c, v in bad.items()) + f"\nexit codes {codes}\n{logs}")


def test_bad_configs_raise(tmp_path):
    results, codes, logs = launch(2, "errors", tmp_path, timeout=90)
    assert codes == [0, 0], f"exit codes {codes}\n{logs}"
    for r, res in enumerate(results):
        assert res and all(v == "ok" for v in res.values()), f"rank {r}: {res}"


def test_dead_rank_errors_not_hangs(tmp_path):
    t0 = time.monotonic()
    results, codes, logs = launch(2, "dead_rank", tmp_path, timeout=90)
    assert "timeout" not in codes, f"hung: {logs}"
    assert codes[1] == 17
    assert results[0].get("dead_rank", "").startswith("ok"), f"{results}\n{logs}"
    assert time.monotonic() - t0 < 90
