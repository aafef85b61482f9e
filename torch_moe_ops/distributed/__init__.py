"""Tensor and expert parallelism for ``FusedMoE`` on ``torch.distributed`` (see ``docs/distributed.md``).

Below the layer: ``plan`` places a layer (plain ``Placement`` data), ``comm.parallel_forward`` wraps the
layer's own experts call with the collectives, ``eplb.rebalance`` moves the rows of the tensors it is
given. Nothing here holds or writes a layer. ``comm`` and ``eplb`` import ``torch.distributed`` and are
imported on use."""
from .config import ParallelConfig
from .placement import linear_ranges, map_logical_to_physical, tables_from_physical_to_logical
from .plan import Placement, plan

__all__ = ["ParallelConfig", "Placement", "linear_ranges", "map_logical_to_physical", "plan",
           "tables_from_physical_to_logical"]
