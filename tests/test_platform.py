"""``torch_moe_ops/_platform.py``: the environment switches. Boolean switches take 1/0 (true/false, yes/no,
on/off, any case), fall back to their default when unset or empty, and refuse anything else naming it; the
named-mode switches refuse an unknown mode."""
from __future__ import annotations

import pytest

from torch_moe_ops import _platform as P

FLAGS = [(P.DEBUG_ENV, P.debug_checks, False), (P.PLANS_ENV, P.launch_plans, True),
         (P.DIRECT_LAUNCH_ENV, P.direct_launch, True), (P.FUSE_ACTIVATION_ENV, lambda: P.fuse_activation(17), False),
         (P.FUSE_SUM_ENV, lambda: P.fuse_sum(1), True), (P.SWAP_AB_ENV, P.swap_ab, False),
         (P.PREFETCH_ENV, P.prefetch_l2, False), (P.PDL_ENV, P.pdl, False)]


@pytest.mark.parametrize("name,read,default", FLAGS, ids=[f[0] for f in FLAGS])
def test_boolean_switches(monkeypatch, name, read, default):
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value, want in (("1", True), ("TRUE", True), (" on ", True), ("yes", True), ("0", False), ("off", False),
                        ("False", False), ("", default), (" ", default)):  # empty: as if unset
        monkeypatch.setenv(name, value)
        assert read() is want, value
    monkeypatch.setenv(name, "2")
    with pytest.raises(ValueError, match=f"{name} must be 1 or 0.*'2'"):
        read()


def test_the_activation_fuses_up_to_16_tokens_unless_told(monkeypatch):
    """FUSE_ACTIVATION unset: GEMM1 applies the activation up to 16 tokens (the sizes timed), not in the
    batch-invariant mode; 1 / 0 force it."""
    monkeypatch.delenv(P.FUSE_ACTIVATION_ENV, raising=False)
    assert P.fuse_activation(1) and P.fuse_activation(16) and not P.fuse_activation(17)
    assert not P.fuse_activation(1, invariant=True)
    monkeypatch.setenv(P.FUSE_ACTIVATION_ENV, "0")
    assert not P.fuse_activation(1)
    monkeypatch.setenv(P.FUSE_ACTIVATION_ENV, "1")
    assert P.fuse_activation(4096)


def test_the_sum_fuses_at_T1_unless_told(monkeypatch):
    """FUSE_SUM unset: GEMM2 sums the slots at T = 1 only (slower on aligned rows, timed); 1: up to 16 tokens; 0:
    never."""
    monkeypatch.delenv(P.FUSE_SUM_ENV, raising=False)
    assert P.fuse_sum(1) and not P.fuse_sum(2)
    monkeypatch.setenv(P.FUSE_SUM_ENV, "1")
    assert P.fuse_sum(1) and P.fuse_sum(16) and not P.fuse_sum(17)
    monkeypatch.setenv(P.FUSE_SUM_ENV, "0")
    assert not P.fuse_sum(1)


def test_mode_switches_refuse_unknown_modes(monkeypatch):
    monkeypatch.setenv(P.COMPILE_ENV, "inductor")
    with pytest.raises(ValueError, match=f"{P.COMPILE_ENV} must be one of"):
        P.compile_mode()
    monkeypatch.setenv(P.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=f"{P.BACKEND_ENV} must be 'reference' or 'triton'"):
        P.cpu_backend()



@pytest.mark.parametrize("name,read,allowed,default", [(P.LOAD_AHEAD_ENV, P.load_ahead, (0, 1, 2), 1)])
def test_integer_switches_take_their_values_only(monkeypatch, name, read, allowed, default):
    """LOAD_AHEAD 0 / 1 / 2: unset or empty gives the default, anything else raises naming the switch and its
    values."""
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    for v in allowed:
        monkeypatch.setenv(name, f" {v} ")
        assert read() == v
    monkeypatch.setenv(name, "")
    assert read() == default
    for bad in ("3", "yes"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name} must be {allowed[0]}, {allowed[1]} or {allowed[2]}, got '{bad}'"):
            read()


def test_getenv_reads_the_live_environment(monkeypatch):
    """``getenv`` (the per-call switch reader, cheaper than ``os.environ.get``) gives what ``os.environ.get`` gives
    for set, empty, non-ASCII and unset names, sees every write and deletion, and falls back to the mapping when
    ``os.environ`` was replaced by another object."""
    import os

    from torch_moe_ops._platform import getenv

    name = "TORCH_MOE_OPS_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) == "" and getenv(name, "d") == "d"
    for value in ("1", "", " off ", "µs-é"):
        monkeypatch.setenv(name, value)
        assert getenv(name, "d") == os.environ.get(name, "d") == value
    monkeypatch.delenv(name)
    assert getenv(name, "d") == "d"
    monkeypatch.setattr(os, "environ", {name: "replaced"})
    assert getenv(name) == "replaced" and getenv("TORCH_MOE_OPS_TEST_UNSET", "d") == "d"
