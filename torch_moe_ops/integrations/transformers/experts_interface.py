"""The ``"torch_moe_ops"`` experts implementation for transformers' ``ExpertsInterface``.

Models whose experts class is decorated with ``@use_experts_implementation`` dispatch their experts forward
through ``config._experts_implementation``; after ``register()`` (done when
``torch_moe_ops.integrations.transformers`` is imported) ``experts_implementation="torch_moe_ops"`` in
``from_pretrained`` or ``model.set_experts_implementation("torch_moe_ops")`` runs them with
``torch_moe_ops.fused_experts`` on the module's own full-precision tensors (no copy, no quantization; use
``patch`` / ``from_pretrained`` of this package for quantized experts and for the router inside the op).

Supported experts modules: concatenated gate/up (``[E, 2I, H]``, the default gate ``act(gate) * up``) or
no gate (``up_proj`` ``[E, I, H]``), optional biases, not transposed, no post-expert norm, no expert
parallelism. Anything else raises a ``ValueError`` naming the module and what to use instead.
"""
from __future__ import annotations

import torch
from transformers.integrations import moe as _hf_moe

from ...ops import fused_experts
from .models import Unsupported, activation_of

#: transformers' ``act(gate) * up`` on concatenated halves (private there: None if a version lacks it)
_DEFAULT_GATE = getattr(_hf_moe, "_default_apply_gate", None)

NAME = "torch_moe_ops"


def _activation(module) -> str:
    cls = type(module)
    problems = []
    if getattr(module, "is_transposed", False):
        problems.append("its weights are stored transposed")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("it has a post-expert norm")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("it is expert-parallel")
    gated = getattr(module, "has_gate", True)
    if gated and not getattr(module, "is_concatenated", True):
        problems.append("its gate/up rows are interleaved")
    if gated and getattr(cls, "_apply_gate", _DEFAULT_GATE) is not _DEFAULT_GATE:
        problems.append("it has its own gating function (_apply_gate)")
    if not problems:
        try:
            return activation_of(module.act_fn, gated)
        except (Unsupported, AttributeError) as exc:
            problems.append(str(exc))
    raise ValueError(f'experts_implementation="{NAME}" cannot run {cls.__name__}: {"; ".join(problems)}. Use '
                     "torch_moe_ops.integrations.transformers.patch(model) (or its from_pretrained), which converts "
                     "the layout once, or another experts_implementation")


def torch_moe_ops_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [T, H], top_k_index [T, k] int, top_k_weights [T, k] float -> [T, H] in hidden_states' dtype."""
    activation = _activation(self)
    gated = getattr(self, "has_gate", True)
    w13 = self.gate_up_proj if gated else self.up_proj
    b13 = b2 = None
    if getattr(self, "has_bias", False):
        b13 = self.gate_up_proj_bias if gated else self.up_proj_bias
        b2 = self.down_proj_bias
    x = hidden_states.to(w13.dtype)
    out = fused_experts(x, w13, self.down_proj, top_k_weights.contiguous(), top_k_index.contiguous(),
                        activation=activation, w13_bias=b13, w2_bias=b2)
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Register ``"torch_moe_ops"`` with transformers' ``ExpertsInterface`` (idempotent); False when the
    installed transformers has no such interface."""
    interface = getattr(_hf_moe, "ExpertsInterface", None)
    if interface is None:
        return False
    interface.register(NAME, torch_moe_ops_experts_forward)
    return True
