"""Tile configs for the grouped MoE GEMM: docs/design.md §8.1 heuristics, per-device tuned tables, interpreter
tiles.

Tuned tables live in ``torch_moe_ops/_kernels/tuned/*.json`` (written by ``benchmarks/tune.py``)::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "entries": [{"E": 8, "N": 28672, "K": 4096, "scheme": "none",
                  "configs": {"1": {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1,
                                    "num_warps": 4, "num_stages": 4}, "64": {...}}}]}

A file may name its GPU's ``"capability": [9, 0]``: its entries then also serve GPUs of that family with no
table of their own (an H200 uses an H100's tiles). An entry is keyed by
``(device name, E local, N, K, scheme.table_key(block))`` (N, K of *this* GEMM, K
logical: GEMM1 is ``(2I or I, H)``, GEMM2 ``(H, I)``; the key is the scheme name, plus the scale tile for
tiled schemes: ``fp8_block_128x128``, ``int4_w4a16_1x128``) and maps a token count T to a config. Lookup
takes the entry of the smallest tuned T ≥ T, else the largest tuned T: a config tuned for more rows than
we have is safe (at worst a little padding), while snapping down to a smaller-T config could pick tiny
tiles for a large batch (docs/design.md §12.6). No table, or a config that the scheme cannot use, falls
back to the heuristic. ``block_m`` is also the alignment block size. ``benchmarks/tune.py`` writes the
tables. Lookups use ``token_bucket(T)``, so only tuned T in ``TOKEN_BUCKETS`` are ever served.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from .._platform import getenv, interpret_mode, swap_ab
from ..schemes import QuantScheme, cdiv

TUNED_DIR = Path(__file__).with_name("tuned")
#: Extra directory of tuned JSON files (searched after the packaged one; its entries win on clashes).
TUNED_DIR_ENV = "TORCH_MOE_OPS_TUNED_DIR"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration of ``_moe_gemm_kernel``; ``block_m`` doubles as the align block size."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def parse(cls, text: str) -> "TileConfig":
        """From "BMxBNxBK[xWARPSxSTAGES]" (GROUP_M 1: decode tiles; 4 warps, 4 stages unless given), the
        benchmarks' and tools' spelling of a tile."""
        try:
            v = [int(t) for t in text.split("x")]
        except ValueError:
            v = []
        if len(v) not in (3, 5):
            raise ValueError(f"tiles {text!r}: BMxBNxBK or BMxBNxBKxWARPSxSTAGES")
        return cls(*v[:3], 1, *(v[3:] or [4, 4]))


def _shrink_to(x: int, cap: int) -> int:
    """Smallest power of two ≥ x (at least 16), capped at ``cap``: tiles never dwarf a tiny dim."""
    p = 16
    while p < cap and p < x:
        p *= 2
    return min(p, cap)


def _fit_block_k(block_k: int, group_k: int, floor: int = 32) -> int:
    """Largest power-of-two BLOCK_K <= block_k dividing the scale tile's K size (docs/design.md §3): a K step
    then lies in one tile. The floor is 32 for fp8 dots on GPUs (an fp8 ``tl.dot`` needs K >= 32), 16
    otherwise (and in the interpreter)."""
    while block_k > floor and group_k % block_k:
        block_k //= 2
    if group_k % block_k:
        raise ValueError(f"block_shape[1] = {group_k}: the GPU needs a scale tile K size with a power-of-two "
                         f"divisor >= {floor} (an fp8 tl.dot needs K >= 32), e.g. 32, 64 or 128")
    return block_k


def fits_scale_tile(block_k: int, scheme: QuantScheme, block) -> bool:
    """BLOCK_K suits the scheme's scale tile ``block`` (canonical, None when untiled): it divides the tile's K
    size (a K step lies in one tile), or, for [1, G] groups, is a multiple of G (each value is scaled before
    the dot, ``gemm._packed_step``)."""
    if not scheme.tiled:
        return True
    return block[1] % block_k == 0 or (scheme.flags.W_GROUP_SCALE and block_k % block[1] == 0)


def _min_block_k(scheme: QuantScheme) -> int:
    """Packed weights (int4: 2 per byte) run one tl.dot per value of a byte, each needing K >= 16."""
    return 16 * (scheme.weight.pack if scheme.quantized else 1)


def _block(scheme: QuantScheme, block) -> tuple[int, int] | None:
    """The scale tile as a tuple (the scheme's default when a tiled scheme gets None; None when untiled)."""
    if not scheme.tiled:
        return None
    return tuple(block) if block is not None else scheme.block_shape(None)


#: 4-bit decode tiles narrow from 128 to 32 columns when the 128-wide grid (a row block per touched expert at
#: most) would have fewer programs than this, about 3 an SM of a 132-SM H100 / H200: their K loops are
#: issue-bound, and few programs leave SMs with one warp a scheduler or none (docs/kernels.md, "Why 4-bit
#: decode at T = 1 runs far from the bytes"; H100, fused_moe at T = 1, CUDA graph after a clean L2 flush:
#: GPT-OSS-20B int4 83.3 -> 65.8 us, mxfp4 90.2 -> 74.1, Qwen3-30B-A3B int4 27.7 -> 26.9, mxfp4 32.3 -> 29.0).
PACKED_DECODE_PROGRAMS = 384


def default_config(T: int, E: int, N: int, K: int, scheme: QuantScheme, block=None, *, top_k: int) -> TileConfig:
    """Heuristic tiles for T tokens routed to ``top_k`` of E experts; sound for any shape (tiny N/K shrink
    the tiles), used when no tuned entry exists. K is the logical reduction size.

    fp8 block scales follow docs/design.md §8.1. The other schemes depart from §8.1 (which keys BLOCK_M on
    T) after tuning Mixtral, Qwen3-30B-A3B and GPT-OSS-20B shapes on an H100
    (``tuned/NVIDIA_H100_80GB_HBM3.json``): the best BLOCK_M tracks the rows per expert ``r = T·k/E``, at
    about ``next_pow2(2r)`` in [16, 128]; GROUP_M = 16 once an expert spans several row blocks (its blocks
    then read its weight tiles from L2 once: Mixtral T=1024 GEMM1 1.55 ms → 1.10 ms); large tiles are
    128×256 with 4 stages (17–20 % faster than 128×128×3 at T = 16384); fp8 decode tiles use 3 stages
    (Qwen3 fp8 T=1 GEMM2: 89 µs with 4, 12 µs with 3). Packed 4-bit weights (int4, mxfp4) take 16 x 128 x 128
    tiles up to 64 rows per expert (BLOCK_K halved to 64 when that makes it divide K) and 128 x 128 x 64 with
    8 warps beyond: chosen from compiled code (tools/sm90_compile.py: registers, spills, K-loop instructions;
    docs/kernels.md); decode tiles narrow to 16 x 32 where 16 x 128 would give few programs
    (``PACKED_DECODE_PROGRAMS``, timed at T = 1). Groups smaller than BLOCK_K (int4 G = 32 / 64, mxfp4) are scaled value
    by value before the dot (``gemm._packed_step``); fp16 activations cut BLOCK_K to G at launch."""
    block = _block(scheme, block)
    fp8 = scheme.fp8_dot
    if scheme.flags.BLOCK_SCALES:
        cfg = TileConfig(
            block_m=16 if T <= 64 else 64,
            block_n=128,
            block_k=_fit_block_k(128, block[1]),
            group_m=1 if T <= 16 else 32,
            num_warps=4,
            num_stages=3,
        )
    else:
        rows_per_expert = T * top_k / max(E, 1)
        block_m = 16
        while block_m < 128 and block_m < 2 * rows_per_expert:
            block_m *= 2
        if scheme.packed and rows_per_expert <= 64:
            # 4-bit values decode in registers: 16 x 128 tiles up to 64 rows per expert (H200, int4 G = 128, the
            # former decode: Qwen3 GEMM1 T=1 69 -> 31 us, T=256 727 -> 315 us; Mixtral GEMM1 T=256 2947 -> 2161 us),
            # 16 x 32 where 128 columns would leave too few programs (PACKED_DECODE_PROGRAMS)
            block_m = 16
            narrow = min(E, T * top_k) * cdiv(N, 128) < PACKED_DECODE_PROGRAMS
            tiles = dict(block_n=32 if narrow else 128, block_k=128, num_warps=4, num_stages=4)
        elif scheme.packed:  # the 16-bit 128 x 256 tiles spill 470-920 B a thread with decoded values in
            # registers (tools/sm90_compile.py, triton 3.6); 128 x 128 x 64 with 8 warps spills none (mxfp4) or
            # 48-168 B (int4) and issues 20-45 % fewer K-loop instructions per MAC (not yet timed)
            tiles = dict(block_n=128, block_k=64, num_warps=8, num_stages=4)
        elif block_m <= 32:  # decode: memory bound, many narrow column tiles keep every SM streaming weights
            # ...except fp8 with a handful of rows (Qwen3 fp8_tensor T=1 GEMM1 on H100: 114.5 us at 64, 21.6 at 128)
            block_n = 128 if fp8 and T * top_k <= 64 else 64
            tiles = dict(block_n=block_n, block_k=128, num_warps=4, num_stages=3 if fp8 else 4)
        elif block_m == 64:
            tiles = dict(block_n=128, block_k=128, num_warps=4, num_stages=3)
        else:
            tiles = dict(block_n=256, block_k=128 if fp8 else 64, num_warps=8, num_stages=4)
        cfg = TileConfig(block_m=block_m, group_m=16 if rows_per_expert > block_m else 1, **tiles)
    block_k = _shrink_to(K, cfg.block_k)
    if fp8:
        block_k = max(block_k, 32)  # an fp8 tl.dot needs K >= 32 on the GPU; a tiny K is masked instead
    block_k = max(block_k, _min_block_k(scheme))
    if scheme.packed and K % block_k:  # a masked K tail in every step of a decoding loop costs registers:
        # GPT-OSS's K = 2880 spills at BLOCK_K 128, not at 64 (tools/sm90_compile.py); halve to 64 if that helps
        block_k = next((b for b in (block_k // 2, block_k // 4) if b >= 64 and K % b == 0), block_k)
    if not fits_scale_tile(block_k, scheme, block):
        block_k = _fit_block_k(block_k, block[1], floor=max(32 if fp8 else 16, _min_block_k(scheme)))
    return dataclasses.replace(cfg, block_n=_shrink_to(N, cfg.block_n), block_k=block_k)


def interpreter_config(scheme: QuantScheme, block=None) -> TileConfig:
    """Small tiles for CPU interpreter runs (each program is simulated in NumPy: keep tiles tiny)."""
    block_k = 32
    if scheme.tiled:
        block_k = _fit_block_k(32, _block(scheme, block)[1], floor=_min_block_k(scheme))
    return TileConfig(block_m=16, block_n=32, block_k=block_k, group_m=1, num_warps=4, num_stages=1)


def _tuned_files(extra_dir: str | None = None) -> list[Path]:
    files = sorted(TUNED_DIR.glob("*.json")) if TUNED_DIR.is_dir() else []
    if extra_dir and Path(extra_dir).is_dir():
        files += sorted(Path(extra_dir).glob("*.json"))
    return files


@functools.cache
def _load_tables(files: tuple[Path, ...]) -> dict:
    """{(device, E, N, K, scheme): {T: TileConfig}} from every tuned file (later files win), and the same
    under ``family(capability)`` for files that name their GPU's compute capability."""
    tables: dict = {}
    family_device: dict = {}  # a family entry holds one device's configs (the first file's), never a mix
    for path in files:
        data = json.loads(path.read_text())
        owners = [data["device"]] + ([family(data["capability"])] if data.get("capability") else [])
        for entry in data.get("entries", []):
            configs = {int(t): TileConfig.from_dict(c) for t, c in entry["configs"].items()}
            for owner in owners:
                key = (owner, int(entry["E"]), int(entry["N"]), int(entry["K"]), entry["scheme"])
                if owner != data["device"] and family_device.setdefault(key, data["device"]) != data["device"]:
                    continue
                tables.setdefault(key, {}).update(configs)
    return tables


def family(capability) -> str:
    """The table owner that GPUs of one compute capability share: ``"sm90"`` for an H100 or an H200."""
    major, minor = capability
    return f"sm{int(major)}{int(minor)}"


def tuned_tables() -> dict:
    return _load_tables(tuple(_tuned_files(getenv(TUNED_DIR_ENV))))


@functools.cache
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def device_family(index: int) -> str | None:
    """``family`` of the GPU's compute capability (None when it cannot be read)."""
    try:
        return family(torch.cuda.get_device_capability(index))
    except (RuntimeError, AssertionError):
        return None


#: A table tuned up to at least this T also serves larger T with its largest entry; one tuned for decode only
#: (e.g. T = 1 and 16, ``benchmarks/gpu_tune.sh``'s default) leaves larger T to the heuristic: a decode tile
#: would be a disaster at prefill.
PREFILL_TUNED = 1024


def lookup_tuned(table: dict[int, TileConfig], T: int) -> TileConfig | None:
    """The config of the smallest tuned T' ≥ T, else of the largest tuned T' if that is a prefill size
    (``PREFILL_TUNED``), else None (never a smaller-T config)."""
    above = [t for t in table if t >= T]
    if above:
        return table[min(above)]
    return table[max(table)] if max(table) >= PREFILL_TUNED else None


def _usable(cfg: TileConfig, scheme: QuantScheme, block) -> bool:
    """A tuned config fits the scheme: BLOCK_K fits the scale tile (``fits_scale_tile``) and is a multiple of
    what packed weights need."""
    return cfg.block_k % _min_block_k(scheme) == 0 and fits_scale_tile(cfg.block_k, scheme, block)


#: The token counts tiles are chosen for (the tuned tables' keys): T is served as the smallest bucket >= T,
#: beyond the last one as ``BEYOND``. At most 8 graphs per compiled function (T = 1 and 7 ranges), Dynamo's
#: default recompile limit.
TOKEN_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384)
BEYOND = 65536


def token_bucket(T) -> int:
    """The token count tiles, the alignment block size and the alignment path are chosen for.

    Every T of one bucket gets the same launches, so a graph traced for a symbolic T
    (``torch.compile(dynamic=True)``; docs/host-overhead.md) launches exactly what eager launches for each T
    it accepts. With a ``SymInt`` the comparisons become Dynamo guards (``16 < T <= 64``): one graph per
    bucket visited."""
    for b in TOKEN_BUCKETS:
        if T <= b:  # a SymInt comparison: a guard
            return b
    return BEYOND


def get_config(
    T: int,
    E: int,
    N: int,
    K: int,
    scheme: QuantScheme,
    block=None,
    device: torch.device | None = None,
    *,
    top_k: int,
    invariant: bool = False,
    dtype: torch.dtype | None = None,
    block_m: int | None = None,
) -> TileConfig:
    """Config for one grouped GEMM of T tokens, each routed to ``top_k`` of E local experts, with weights
    [E, N, K] (K logical). ``block``: the canonical scale tile (None for untiled schemes). ``invariant``:
    batch-invariant tiles (``invariant_config``); ``dtype``: the activations' (sizes its shared memory);
    ``block_m``: this BLOCK_M instead of the config's (GEMM2 shares GEMM1's alignment), stages refitted.

    Order: interpreter tiles (CPU tensors / TRITON_INTERPRET=1) → tuned table of this device → §8.1
    heuristic, all keyed on ``token_bucket(T)``. Pure host logic on shapes: no device sync, same answer for
    the same bucket."""
    T = token_bucket(T)
    E, N, K, top_k = int(E), int(N), int(K), int(top_k)  # (sizes specialized by a trace may be SymInts)
    if interpret_mode() or device is None or device.type != "cuda":
        cfg = interpreter_config(scheme, block)  # one config for every T (the mode pairs rows: fused_experts)
        return cfg if block_m is None else dataclasses.replace(cfg, block_m=block_m)
    index = device.index if device.index is not None else torch.cuda.current_device()
    a_bytes = 1 if scheme.fp8_dot else (dtype.itemsize if dtype is not None else 2)
    return _cuda_config(T, E, N, K, scheme, _block(scheme, block), top_k, device_name(index),
                        device_family(index), getenv(TUNED_DIR_ENV), bool(invariant), a_bytes,
                        device_smem(index), block_m, bool(invariant) and swaps(scheme, a_bytes, invariant=True))


@functools.cache
def device_smem(index: int) -> int:
    """Shared memory one block may opt into on the GPU (H100: 227 KB; A100 163 KB; consumer GPUs ~99 KB);
    ``SMEM_BUDGET`` when torch cannot say."""
    try:
        return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)) or \
            SMEM_BUDGET
    except Exception:  # noqa: BLE001 - no driver (tools/sm90_compile.py), an old torch: the sm90 figure
        return SMEM_BUDGET


@functools.lru_cache(maxsize=4096)
def _cuda_config(T, E, N, K, scheme, block, top_k, dev_name, dev_family, extra_dir, invariant=False,
                 a_bytes=2, smem=None, block_m=None, swapped=False) -> TileConfig:
    """Cached: a decode step pays a dict lookup, not a directory scan (key includes the table location).
    This GPU's table first, then one of a GPU of the same compute capability (an H200 takes an H100's), then
    the heuristic, fitted to shared memory (``fit_smem``); under ``invariant``, pinned to the largest bucket's
    reduction (``invariant_config``; ``swapped``: the GEMM swaps its operands, ``swaps``)."""
    def lookup(t):
        tables = _load_tables(tuple(_tuned_files(extra_dir)))
        for owner in (dev_name, dev_family):
            table = tables.get((owner, E, N, K, scheme.table_key(block)))
            if table:
                cfg = lookup_tuned(table, t)
                if cfg is not None and _usable(cfg, scheme, block):
                    return cfg
        return default_config(t, E, N, K, scheme, block, top_k=top_k)

    smem = smem or SMEM_BUDGET
    if invariant:
        cfg = invariant_config(lookup(T), lookup(BEYOND), scheme, a_bytes, smem, swapped)
    else:
        cfg = lookup(T)
    if block_m is not None:  # (a larger BLOCK_M may need fewer stages; the K step stays)
        cfg = dataclasses.replace(cfg, block_m=block_m)
    return fit_smem(cfg, scheme, a_bytes, smem, swapped)  # (fp32 activations: the 16-bit tiles' stages overflow)


# ------------------------------------------------------------------------------ shared memory, batch invariance
#: Smallest BLOCK_M of batch-invariant tiles: from 64 rows the sm90 dot is a wgmma, below an mma.sync, and
#: fp8 dots round differently in the two (H100: fp8_block rows differ between T <= 64 and T = 4096 with the
#: same BLOCK_K; docs/batch-invariance.md).
INVARIANT_MIN_BLOCK_M = 64
#: Shared memory a config may plan for its pipelined A and B tiles: sm90's 227 KB a block. Triton 3.6 allocates
#: exactly ``smem_bytes`` for these kernels (tools/sm90_compile.py: 64x256x64 x3 = 122880, 128x256x64 x4 =
#: 196608) and reuses it for the epilogue; the H100 table's largest, 16x256x128 x3 bf16, plans 221184.
SMEM_BUDGET = 227 * 1024


def plain_dot(scheme: QuantScheme, a_bytes: int) -> bool:
    """Unquantized experts in a 16-bit dtype: both operands reach the tensor cores as loaded and every K step
    accumulates into the same fp32 registers (``acc = tl.dot(a, b, acc)``), so neither BLOCK_K nor the MMA kind
    changes an output's bits. H100 (docs/batch-invariance.md): the default bf16 tiles (16-row mma.sync with
    BLOCK_K 128 at T <= 64, 128-row wgmma with BLOCK_K 64 at T = 4096) gave bitwise equal rows, where weights
    converted in registers (int8, int4, mxfp4) and fp8 dots did not."""
    return not scheme.quantized and a_bytes == 2


def swaps(scheme: QuantScheme, a_bytes: int, block_m: int = 0, invariant: bool = False) -> bool:
    """Whether the GEMM computes the transposed tile ``w @ aᵀ`` (docs/kernels.md "Swapped operands"): weights
    converted in registers (int8 weight-only, int4, mxfp4) against 16-bit activations, whose rows are then the
    MMA's M. Every such GEMM with ``_platform.swap_ab``; by default int4's prefill tiles (BLOCK_M >= 64: 0.75-0.82x
    the unswapped time on an H100, where every other case was slower), except in the batch-invariant mode,
    whose arithmetic may not change with T (``invariant``)."""
    if a_bytes != 2 or not scheme.flags.W_CAST:
        return False
    return swap_ab() or (not invariant and scheme.codec == "int4" and block_m >= INVARIANT_MIN_BLOCK_M)


def joins_k(scheme: QuantScheme, cfg: TileConfig, a_bytes: int, swapped: bool) -> bool:
    """mxfp4 16-bit dots: one dot a K step with the values back in K order (``gemm._packed_step`` JOIN_K)
    instead of the even and the odd k apart, for unswapped wgmma tiles (BLOCK_M >= 64; docs/kernels.md). The two
    sum in different orders, so the choice must be a function of what ``reduction_signature`` holds: swapped
    tiles never join (sm_90a K loop, Qwen3: decode 778 against 884 joined, prefill 335 against 270)."""
    return scheme.codec == "fp4_e2m1" and a_bytes == 2 and not swapped and cfg.block_m >= INVARIANT_MIN_BLOCK_M


def reduction_signature(cfg: TileConfig, scheme: QuantScheme, a_bytes: int = 2, swapped: bool = False) -> tuple:
    """What of a config decides the arithmetic of an output element, hence what batch-invariant tiles share
    across T: nothing for a ``plain_dot``; else the K step (packed and block-scaled steps add a partial dot per
    step; fp8 dots accumulate per step) and the MMA instruction kind (a wgmma from an M of
    ``INVARIANT_MIN_BLOCK_M``: BLOCK_M, or BLOCK_N when ``swapped``). BLOCK_N, GROUP_M, warps and stages only
    decide who computes an element and when."""
    if plain_dot(scheme, a_bytes):
        return ()
    return cfg.block_k, (cfg.block_n if swapped else cfg.block_m) >= INVARIANT_MIN_BLOCK_M


def smem_bytes(cfg: TileConfig, scheme: QuantScheme, a_bytes: int) -> int:
    """Shared memory of the pipelined K loop: ``num_stages`` buffers of an A tile [BM, BK] (``a_bytes`` an
    element) and a B tile [BK, BN] in storage bytes (packed: BK/2 rows of bytes)."""
    if scheme.quantized:
        w_bytes = scheme.weight.qdtype.itemsize / scheme.weight.pack
    else:
        w_bytes = a_bytes
    per_stage = cfg.block_m * cfg.block_k * a_bytes + cfg.block_k * cfg.block_n * w_bytes
    return int(cfg.num_stages * per_stage)


def fit_smem(cfg: TileConfig, scheme: QuantScheme, a_bytes: int = 2, budget: int = SMEM_BUDGET,
             swapped: bool = False) -> TileConfig:
    """``cfg`` with fewer stages (down to 2), then narrower BLOCK_N (down to 32; ``swapped``: to
    ``INVARIANT_MIN_BLOCK_M``, the MMA's M there), until its pipeline fits ``budget`` bytes (the GPU's,
    ``device_smem``); the reduction signature is kept (BLOCK_M never changes: GEMM2 shares GEMM1's). On an H100,
    tuned and heuristic tiles of 16-bit and fp8 activations fit as they are; fp32 activations (4 bytes an
    element, 4-byte weights unquantized) need fewer stages."""
    while smem_bytes(cfg, scheme, a_bytes) > budget and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    min_n = INVARIANT_MIN_BLOCK_M if swapped else 32
    while smem_bytes(cfg, scheme, a_bytes) > budget and cfg.block_n > min_n:
        cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    return cfg


def invariant_config(cfg: TileConfig, anchor: TileConfig, scheme: QuantScheme, a_bytes: int = 2,
                     budget: int = SMEM_BUDGET, swapped: bool = False) -> TileConfig:
    """``cfg`` (the T bucket's tiles) made batch invariant: ``anchor``'s K step (the largest bucket's tiles, so
    prefill keeps its tuned K step) and BLOCK_M >= ``INVARIANT_MIN_BLOCK_M``, fitted to ``budget``. Every
    bucket of one GEMM then has one ``reduction_signature``: each element is computed the same way. Warps come
    in whole warpgroups (a multiple of 4), without which Triton falls back to mma.sync even at 64 rows. A
    ``plain_dot`` keeps ``cfg``: any tiles give it the same bits. ``swapped`` (``swaps``): the weights' rows
    are the MMA's M, so BLOCK_N >= ``INVARIANT_MIN_BLOCK_M`` instead, and a decode tile keeps its few token
    rows (not measured yet)."""
    if plain_dot(scheme, a_bytes):
        return fit_smem(cfg, scheme, a_bytes, budget)
    wide = dict(block_n=max(cfg.block_n, INVARIANT_MIN_BLOCK_M)) if swapped else \
        dict(block_m=max(cfg.block_m, INVARIANT_MIN_BLOCK_M))
    cfg = dataclasses.replace(cfg, block_k=anchor.block_k, num_warps=max(4, cfg.num_warps - cfg.num_warps % 4),
                              **wide)
    return fit_smem(cfg, scheme, a_bytes, budget, swapped)
