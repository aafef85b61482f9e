"""The one checkpoint pipeline (docs/design.md §11, §14): everything about checkpoint files, names, layouts and
formats, and the model-level loading functions. It sits above ``FusedMoE`` (it fills its layers through the
``weight_loader`` machinery) and below the integrations, which call it.

- ``files.py``: which safetensors files of a folder are read (``select_files``) and the ONE safetensors
  reader (``SafetensorsFiles``: headers, lazy slices, tensors);
- ``sources.py``: a checkpoint as ``(name, tensor, origin)`` (folder, file, dict, pairs, one-shot stream);
- ``names.py``: the expert-name parsers; ``layouts.py``: how each model type stores its experts;
- ``formats.py``: which pre-quantized format a checkpoint's experts are in (fp8 block / channel / tensor);
- ``resolve.py``: checkpoint names -> what they fill in a model; ``progress.py``: the byte-counting bars;
- ``report.py``, ``passes.py``, ``load.py``: ``LoadReport``, the check and write passes, and
  ``load_checkpoint`` / ``finalize_loading`` / ``reload_weights``.
"""
from .load import finalize_loading, load_checkpoint, name_layers, reload_weights
from .report import LoadReport
from .sources import iter_checkpoint

__all__ = ["LoadReport", "finalize_loading", "iter_checkpoint", "load_checkpoint", "name_layers", "reload_weights"]
