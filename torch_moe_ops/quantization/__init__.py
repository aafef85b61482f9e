"""Online quantization for ``FusedMoE``: configs and the streaming per-expert loader state."""
from .config import Fp8Config, Int8WeightOnlyConfig, QuantConfig
from .online import ExpertStreamer, LoadError

__all__ = ["ExpertStreamer", "Fp8Config", "Int8WeightOnlyConfig", "LoadError", "QuantConfig"]
