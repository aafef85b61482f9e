"""Online-quantization configs for ``FusedMoE`` (docs/design.md §3, §10). ``LoadError`` is re-exported for
callers of the first release (its home is ``torch_moe_ops.errors``; the streaming state moved to
``torch_moe_ops.loading``)."""
from ..errors import LoadError
from .config import Fp8Config, Int4Config, Int8Config, Int8WeightOnlyConfig, QuantConfig

__all__ = ["Fp8Config", "Int4Config", "Int8Config", "Int8WeightOnlyConfig", "LoadError", "QuantConfig"]
