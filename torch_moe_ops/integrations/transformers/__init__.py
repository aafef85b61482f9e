"""Hugging Face transformers MoE models on torch_moe_ops (docs/transformers.md).

- ``patch(model, quant_config=None) -> PatchReport``: replace every sparse-MoE block of a loaded model in
  place (router, routed experts, shared experts), optionally quantizing the experts one by one.
- ``from_pretrained(path, quant_config=None, device=..., dtype=..., **hf_kwargs)``: build the model with
  transformers, except its routed experts, which stream from the safetensors files straight into their final
  (quantized) storage.
- ``experts_implementation="torch_moe_ops"``: registered with transformers' ``ExpertsInterface`` on import.

Importing this module imports transformers (``pip install torch-moe-ops[hf]``).
"""
from __future__ import annotations

try:
    import transformers as _transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("torch_moe_ops.integrations.transformers needs transformers: "
                      "pip install 'torch-moe-ops[hf]'") from exc

from .block import ROUTINGS, MoEBlock, Router, sparsemixer
from .experts_interface import NAME as EXPERTS_IMPLEMENTATION
from .experts_interface import register as register_experts_implementation
from .from_pretrained import from_pretrained
from .models import MODEL_TYPES, PLANNERS, BlockPlan, Unsupported, plan_block
from .patch import PatchReport, patch

register_experts_implementation()

__all__ = ["EXPERTS_IMPLEMENTATION", "MODEL_TYPES", "PLANNERS", "ROUTINGS", "BlockPlan", "MoEBlock", "PatchReport",
           "Router", "Unsupported", "from_pretrained", "patch", "plan_block", "register_experts_implementation",
           "sparsemixer"]
