"""Online-quantization configs for ``FusedMoE`` (docs/design.md §3, §10): the public import path
``torch_moe_ops.quantization.Fp8Config``. The configs live next to the schemes they name
(``torch_moe_ops/schemes/configs.py``); ``LoadError`` is re-exported for callers of the first release (its home
is ``torch_moe_ops.errors``)."""
from ..errors import LoadError
from ..schemes.configs import Fp8Config, Int4Config, Int8Config, Int8WeightOnlyConfig, Mxfp4Config, QuantConfig

__all__ = ["Fp8Config", "Int4Config", "Int8Config", "Int8WeightOnlyConfig", "LoadError", "Mxfp4Config", "QuantConfig"]
