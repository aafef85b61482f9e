"""Tensor and expert parallelism for ``FusedMoE`` on ``torch.distributed`` (see ``docs/distributed.md``)."""
from .config import ParallelConfig
from .placement import linear_ranges, map_logical_to_physical, tables_from_physical_to_logical

__all__ = ["ParallelConfig", "linear_ranges", "map_logical_to_physical", "tables_from_physical_to_logical"]
