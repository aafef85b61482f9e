"""Streaming weight loading below ``FusedMoE`` (docs/design.md §10, §11): the per-layer streaming state
(``ExpertStreamer``), the ``weight_loader`` logic (``WeightLoader``) and the plain data it works on
(``ExpertLayout``, ``LoadTargets``). Nothing here imports the layer; the checkpoint-level functions
(``load_checkpoint``, ``finalize_loading``, ``reload_weights``) live above it in
``torch_moe_ops.checkpoints``."""
from ..errors import LoadError
from .layout import ExpertLayout, orient
from .loader import LoadTargets, Piece, WeightLoader
from .streamer import BIASES, CORRECTION, LOADABLE, WEIGHTS, ExpertStreamer, format_missing, required_keys

__all__ = ["BIASES", "CORRECTION", "LOADABLE", "WEIGHTS", "ExpertLayout", "ExpertStreamer", "LoadError",
           "LoadTargets", "Piece", "WeightLoader", "format_missing", "orient", "required_keys"]
