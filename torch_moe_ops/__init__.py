"""torch-moe-ops: Mixture-of-Experts ops for ``torch.compile``, registered under ``torch.ops.moe``."""
from . import reference, schemes
from ._modes import batch_invariant, is_batch_invariant, set_batch_invariant
from .distributed import ParallelConfig
from .layer import FusedMoE, training  # ``from torch_moe_ops import training`` (docs/training.md)
from .checkpoint import LoadReport, finalize_loading, load_checkpoint, reload_weights
from .ops import (
    OP_NAMES,
    act_and_mul,
    align_block_size,
    clear_launch_plans,
    fused_experts,
    fused_moe,
    moe_sum,
    quantize_activation,
    quantize_weight,
    quantize_weight_into,
    topk_route,
)
from .errors import TornWeightsError
from .quantization import Fp8Config, Int4Config, Int8Config, Int8WeightOnlyConfig, LoadError, Mxfp4Config
from .schemes import QUANT_SCHEMES as EXPERT_SCHEMES
from .integrations import hf_registration as _hf_registration

_hf_registration.install()  # experts_implementation="torch_moe_ops" in transformers, whichever is imported first

#: Names accepted as ``activation`` / ``quantize_weight``'s ``scheme`` (the objects: ``torch_moe_ops.schemes``).
ACTIVATIONS = tuple(schemes.ACTIVATIONS)
WEIGHT_SCHEMES = tuple(schemes.WEIGHT_FORMATS)

try:  # one version source: the installed distribution's metadata (pyproject.toml)
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("torch-moe-ops")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "ACTIVATIONS",
    "Fp8Config",
    "FusedMoE",
    "Int4Config",
    "Mxfp4Config",
    "Int8Config",
    "Int8WeightOnlyConfig",
    "ParallelConfig",
    "LoadError",
    "TornWeightsError",
    "LoadReport",
    "finalize_loading",
    "load_checkpoint",
    "reload_weights",
    "EXPERT_SCHEMES",
    "OP_NAMES",
    "WEIGHT_SCHEMES",
    "act_and_mul",
    "align_block_size",
    "batch_invariant",
    "clear_launch_plans",
    "fused_experts",
    "fused_moe",
    "is_batch_invariant",
    "moe_sum",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_into",
    "reference",
    "schemes",
    "set_batch_invariant",
    "topk_route",
]
