"""``ParallelConfig``: how one ``FusedMoE`` is sharded over a ``torch.distributed`` process group.

Plain data (docs/design.md §5): it imports nothing of the package, and the modules that use it
(``plan.py``, ``comm.py``, ``eplb.py``, the layer) import it, never the other way round."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MODES = ("all_to_all", "all_gather")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor (TP) and expert (EP) parallelism for ``FusedMoE(..., parallel=ParallelConfig(...))``.

    The group (``group``, default the WORLD group) has ``tp_size * ep_size`` ranks; group rank
    ``r = ep_rank * tp_size + tp_rank``.

    - ``ep_size == 1`` (TP only): every rank gets the **same** tokens; each holds ``I / tp`` of every
      expert and the partial outputs are all-reduced (every rank returns the full output).
    - ``ep_size > 1``: every rank has **its own** tokens (data-parallel attention in front); each rank
      holds a contiguous block of physical experts and returns the MoE output of its own tokens.
      ``mode="all_to_all"`` sends each (token, expert) pair to the owning rank and back
      (``tp_size`` must be 1); ``mode="all_gather"`` all-gathers every rank's tokens, runs the local
      experts (and local ``I / tp`` slice) on all of them and reduce-scatters the partial sums (all
      ranks must pass the same number of tokens).
    - ``num_redundant_experts`` (EPLB): extra physical slots holding replicas of logical experts.
    """

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    group: Any = None
    num_redundant_experts: int = 0
    mode: str = "all_to_all"

    def __post_init__(self):
        for name in ("tp_size", "ep_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive int, got {v!r}")
        for name, size in (("tp_rank", self.tp_size), ("ep_rank", self.ep_size)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < size:
                raise ValueError(f"ParallelConfig.{name} must be an int in [0, {size}), got {v!r}")
        r = self.num_redundant_experts
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"ParallelConfig.num_redundant_experts must be an int >= 0, got {r!r}")
        if self.mode not in _MODES:
            raise ValueError(f"ParallelConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if self.mode == "all_to_all" and self.ep_size > 1 and self.tp_size > 1:
            raise ValueError("ParallelConfig: mode='all_to_all' with tp_size > 1 and ep_size > 1 is not supported; "
                             "use mode='all_gather' (or tp_size=1)")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def rank(self) -> int:
        """This rank's index in ``group``."""
        return self.ep_rank * self.tp_size + self.tp_rank

    @classmethod
    def from_group(cls, *, tp_size: int = 1, ep_size: int | None = None, group=None, **kw) -> "ParallelConfig":
        """Fill ranks from ``torch.distributed`` (default: EP over the whole group)."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if ep_size is None:
            if world % tp_size:
                raise ValueError(f"world size {world} is not divisible by tp_size {tp_size}")
            ep_size = world // tp_size
        return cls(tp_size=tp_size, tp_rank=rank % tp_size, ep_size=ep_size, ep_rank=rank // tp_size, group=group, **kw)

    def check_group(self) -> None:
        """Raise when ``torch.distributed`` disagrees with this config (size or rank)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ParallelConfig with tp_size * ep_size > 1 needs torch.distributed.init_process_group(...) "
                               "first (e.g. launch with torchrun)")
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if world != self.world_size:
            raise ValueError(f"ParallelConfig: tp_size * ep_size = {self.tp_size} * {self.ep_size} = {self.world_size} "
                             f"but the process group has {world} ranks")
        if rank != self.rank:
            raise ValueError(f"ParallelConfig: group rank {rank} != ep_rank * tp_size + tp_rank = {self.rank} "
                             f"(tp_rank={self.tp_rank}, ep_rank={self.ep_rank})")
