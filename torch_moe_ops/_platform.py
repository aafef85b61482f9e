"""The one place that answers capability questions: GPU, Triton, interpreter, sm90, backend, debug.

Everything reads the environment at call time so tests can flip switches with ``monkeypatch.setenv``, through
``getenv`` (the per-call path of an op reads switches: ``os.environ.get`` costs ~1-2 µs a read).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Environment switches understood by the library.
BACKEND_ENV = "TORCH_MOE_OPS_BACKEND"  # "reference" (default on CPU) or "triton" (CPU tensors via the interpreter)
DEBUG_ENV = "TORCH_MOE_OPS_DEBUG"  # "1": value checks on CUDA inputs too (may synchronize)
PLANS_ENV = "TORCH_MOE_OPS_LAUNCH_PLANS"  # "0": every CUDA call takes the ordinary launch path
DIRECT_LAUNCH_ENV = "TORCH_MOE_OPS_DIRECT_LAUNCH"  # "0": replays go through Triton 3.6's CudaLauncher.__call__
FUSE_ACTIVATION_ENV = "TORCH_MOE_OPS_FUSE_ACTIVATION"  # GEMM1's epilogue applies gated activations: 1 / 0
FUSE_SUM_ENV = "TORCH_MOE_OPS_FUSE_SUM"  # GEMM2 sums the k slots: unset at T = 1, "1" up to 16 tokens, "0" never
PREFETCH_ENV = "TORCH_MOE_OPS_PREFETCH"  # "1": GEMM1 at T = 1 brings GEMM2's weights into L2
PDL_ENV = "TORCH_MOE_OPS_PDL"  # "1": GEMM2 at T = 1 is launched while GEMM1 runs (programmatic dependent launch)
LOAD_AHEAD_ENV = "TORCH_MOE_OPS_LOAD_AHEAD"  # what decode tiles load a K step ahead: "0" / "1" / "2" (load_ahead)
FUSE_ROUTING_ENV = "TORCH_MOE_OPS_FUSE_ROUTING"  # "0": fused_moe's GEMM1 does not route the token at T = 1
SWAP_AB_ENV = "TORCH_MOE_OPS_SWAP_AB"  # "1": weight-converting GEMMs compute the transposed tile (weights as A)
COMPILE_ENV = "TORCH_MOE_OPS_COMPILE"  # what torch.compile graphs call: "plans", "triton" or "opaque"
COMPILE_MODES = ("plans", "triton", "opaque")


_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
_ENVIRON = os.environ
_ENV_KEYS: dict[str, object] = {}  # name -> os.environ's encoded key


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)`` for switches read on every call, ~5x cheaper: CPython's ``os.environ``
    keeps the encoded environment in its ``_data`` dict, which every write to ``os.environ`` (``monkeypatch``'s
    included) updates, so reading it there is the same live value without the mapping's per-read encoding and
    method layers. Falls back to ``os.environ.get`` where ``os.environ`` is not that object."""
    env = os.environ
    data = getattr(env, "_data", None) if env is _ENVIRON else None
    if data is None:
        return env.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = env.encodekey(name)
    value = data.get(key)
    return default if value is None else env.decodevalue(value)


@functools.lru_cache(maxsize=64)
def _parse_flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")


def _flag(name: str, default: bool | None) -> bool | None:
    """A boolean switch: unset or empty (``export NAME=``) gives ``default``; a value that is not a clear yes or
    no raises, naming it (a typo must not silently leave a switch at its default)."""
    value = getenv(name)
    return default if not value.strip() else _parse_flag(name, value)


def _int_choice(name: str, allowed: tuple[str, ...], default: str) -> int:
    """An integer switch with a few allowed values: unset or empty gives ``default``; anything else raises, naming
    it."""
    value = getenv(name).strip() or default
    if value not in allowed:
        raise ValueError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
    return int(value)


@functools.cache
def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return getenv("TRITON_INTERPRET", "0") == "1"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def is_sm90(device: torch.device | int | None = None) -> bool:
    """True on Hopper (compute capability 9.x)."""
    return has_cuda() and torch.cuda.get_device_capability(device)[0] == 9


def cpu_backend() -> str:
    """Which kernels back the CPU dispatch key: ``"reference"`` or ``"triton"`` (interpreter)."""
    value = getenv(BACKEND_ENV, "reference").strip().lower()
    if value not in ("reference", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'reference' or 'triton', got {value!r}")
    if value == "triton":
        require_triton()
        if not interpret_mode():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before torch_moe_ops is imported"
            )
    return value


def debug_checks() -> bool:
    """True when value checks (ids in range, ...) also run on CUDA inputs (they may synchronize)."""
    return _flag(DEBUG_ENV, False)


def launch_plans() -> bool:
    """True unless ``TORCH_MOE_OPS_LAUNCH_PLANS=0``: CUDA op calls replay recorded launch plans."""
    return _flag(PLANS_ENV, True)


def direct_launch() -> bool:
    """True unless ``TORCH_MOE_OPS_DIRECT_LAUNCH=0``: plans recorded from then on skip ``CudaLauncher.__call__``
    where it only forwards to its C ``launch`` (docs/host-overhead.md)."""
    return _flag(DIRECT_LAUNCH_ENV, True)


#: The largest T the decode fusions cover by default (the token buckets 1 and 16).
DECODE_TOKENS = 16


def fuse_activation(T, invariant: bool = False) -> bool:
    """Whether GEMM1's epilogue applies a gated activation (one launch and one [T·k, 2I] round trip fewer; bitwise
    the activation kernel's output; docs/kernels.md): by default up to 16 tokens, the sizes timed (H100: 2.3–2.8
    µs less a call at T = 1, 2.5–5.4 at T = 16), outside the batch-invariant mode (whose tiles the GPU tests of
    the fusion have not covered yet); ``TORCH_MOE_OPS_FUSE_ACTIVATION=1`` at every T, ``=0`` never. (fp8 schemes
    fuse it at T = 1 only, where GEMM2 quantizes its own input.) Read when a launch plan is recorded. A symbolic T
    is guarded to one side of 16, as its token bucket already is."""
    flag = _flag(FUSE_ACTIVATION_ENV, None)
    return (T <= DECODE_TOKENS and not invariant) if flag is None else flag


def fuse_sum(T) -> bool:
    """Whether GEMM2 also sums the k slots (``moe_sum``'s bits, one launch fewer; docs/kernels.md, "GEMM2 sums
    the slots"): by default at T = 1 (0.2–0.5 µs less a call on the H100); ``TORCH_MOE_OPS_FUSE_SUM=1`` up to 16
    tokens too (aligned rows: 2–7 µs more GEMM2 time than the sum kernel's 2 µs at T = 16 on the H100, one launch
    fewer on the host), ``=0`` never. Read when a launch plan is recorded."""
    flag = _flag(FUSE_SUM_ENV, None)
    if flag is None:
        return isinstance(T, int) and T == 1
    return flag and T <= DECODE_TOKENS


def prefetch_l2() -> bool:
    """Whether GEMM1 at T = 1 brings GEMM2's weights into L2 before its K loop (``TORCH_MOE_OPS_PREFETCH=1``; off
    by default: slower on an H100, docs/kernels.md). Read when a launch plan is recorded."""
    return _flag(PREFETCH_ENV, False)


def pdl() -> bool:
    """Whether GEMM2 at T = 1 is launched as a programmatic dependent launch of GEMM1 (``TORCH_MOE_OPS_PDL=1``; off
    by default: 0.3-0.8 us less a call on an H100, about the noise; docs/kernels.md, "GEMM2 launched while GEMM1
    runs"). Read when a launch plan is recorded."""
    return _flag(PDL_ENV, False)


def load_ahead() -> int:
    """What decode tiles (16 rows) load a K step ahead, before the current step's work (docs/kernels.md, "Why 4-bit
    decode at T = 1 runs far from the bytes"); the same values, so the same bits. ``TORCH_MOE_OPS_LOAD_AHEAD``: 1
    (default) the group scales of a step spanning at most two groups (int4's one, mxfp4's two at BLOCK_K 64),
    fp8_block's block scales and the fp8 row GEMM1 / GEMM2 quantize at T = 1; 2 also the [BK/G, BN] scales of
    wider steps (slower on an H100 for mxfp4 at BLOCK_K 128); 0 none (the A/B). Read when a plan is recorded."""
    return _int_choice(LOAD_AHEAD_ENV, ("0", "1", "2"), "1")


def fuse_routing() -> bool:
    """Whether ``fused_moe``'s GEMM1 routes the token itself at T = 1 when x is its input (no routing launch;
    ``topk_route``'s bits; docs/kernels.md, "Two launches at T = 1"). On by default; ``TORCH_MOE_OPS_FUSE_ROUTING=0``
    launches the routing kernel first. Read when a launch plan is recorded."""
    return _flag(FUSE_ROUTING_ENV, True)


def swap_ab() -> bool:
    """True with ``TORCH_MOE_OPS_SWAP_AB=1``: GEMMs whose weights are converted in registers (int8 weight-only,
    int4, mxfp4) compute the transposed tile ``w @ aᵀ``, so the converted weights are the MMA's A operand, which
    a Hopper wgmma reads from registers, and the tokens are its N (docs/kernels.md, "Swapped operands"). Off
    by default until measured on a GPU. Read when a launch plan is recorded."""
    return _flag(SWAP_AB_ENV, False)


def compile_mode() -> str:
    """What a ``torch.compile`` graph calls for the CUDA expert ops (docs/host-overhead.md; read when a graph is
    traced): ``"plans"`` (default) a lean inference op replaying launch plans (no-grad graphs; the public op
    otherwise), ``"triton"`` the Triton kernels themselves, launched by Inductor, ``"opaque"`` the public op."""
    value = getenv(COMPILE_ENV, "plans").strip().lower()
    if value not in COMPILE_MODES:
        raise ValueError(f"{COMPILE_ENV} must be one of {COMPILE_MODES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 (16 hex digits) of the package's Python sources and tuned tables, read once per process."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def trace_state() -> str:
    """What a ``torch.compile`` graph of our ops may depend on beyond its own code: the package's sources (the
    kernels a ``triton``-mode graph holds) and every ``TORCH_MOE_OPS_*`` switch (the compile mode, fusions, tuned
    tables). torch's compiled-artifact caches key on the Dynamo graph only; the graph carries this string
    (``ops/_registry.mark_traced``) so that a change makes a new artifact (docs/compile.md, "Caches")."""
    switches = ";".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TORCH_MOE_OPS_"))
    return f"{_source_digest()};{switches}"


# torch._dynamo.assume_constant_result (it sets this attribute, tests/ops/test_trace_state.py): Dynamo calls the
# function while tracing and bakes the string into the graph (importing Dynamo here would cost ~1.4 s at import).
trace_state._dynamo_marked_constant = True


def require_triton() -> None:
    if not has_triton():
        raise RuntimeError("torch_moe_ops: this path needs Triton (pip install triton); it is not installed")


def describe(device: torch.device | str | None = None) -> str:
    """One line naming the device and the backend that serves it, for tables and logs."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} / triton"
    return "cpu / " + ("triton-interpreter" if cpu_backend() == "triton" else "reference")
