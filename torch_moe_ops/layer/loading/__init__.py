"""The per-layer loading machinery below ``FusedMoE`` (docs/design.md §10, §11): the ``weight_loader`` logic
(``WeightLoader``), the streaming state (``ExpertStreamer``), the pieces as keys (``keys.py``), the value
checks, the layer's shapes as plain data (``ExpertLayout``) and the pre-quantized fp8 pieces.

Nothing here reads the layer object: a ``WeightLoader`` gets an ``ExpertLayout`` and a quant config when it is
made and the tensors to write (``LoadTargets``) with each call. The checkpoint pipeline (names, sources,
``load_checkpoint``) sits above the layer and calls it."""
from .layout import ExpertLayout, orient
from .loader import LoadTargets, Piece, WeightLoader
from .streamer import BIASES, CORRECTION, LOADABLE, WEIGHTS, ExpertStreamer, format_missing, required_keys

__all__ = ["BIASES", "CORRECTION", "LOADABLE", "WEIGHTS", "ExpertLayout", "ExpertStreamer", "LoadTargets", "Piece",
           "WeightLoader", "format_missing", "orient", "required_keys"]
