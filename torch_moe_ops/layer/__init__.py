"""``FusedMoE`` as a package (docs/architecture.md): the module and its forward (``module.py``), composed of its
static facts (``spec.py``), tensors (``storage.py``), placement tables and EPLB (``tables.py``), loading API
(``weights.py``), input rules (``inputs.py``), op calls (``calls.py``), training rules (``training.py``) and the
per-layer loading machinery (``loading/``)."""
from . import training
from .module import FusedMoE
from .spec import LayerSpec

__all__ = ["FusedMoE", "LayerSpec", "training"]
