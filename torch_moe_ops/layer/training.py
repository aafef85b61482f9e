"""Training rules of ``FusedMoE`` (docs/training.md): which parameters train, and the experts call that saves
GEMM1's output for the backward instead of recomputing it.

The ops themselves are differentiable (``torch_moe_ops.ops.autograd``); a layer trains once its parameters
require grad. The layer calls these rules; they are public as ``torch_moe_ops.training``:

- ``check_trainable(trainable, save_activations, parallel)``: the constructor's checks (``spec.py`` runs them
  with the layer's other argument checks).
- ``set_trainable(layer)``: ``w13_weight`` / ``w2_weight`` of an unquantized layer and both biases require
  grad; quantized weights, their scales and ``e_score_correction_bias`` (selection only) stay frozen.
- ``run_experts_saving(layer, x, topk_weights, topk_ids)``: the layer's ``fused_experts`` call through the
  saving forward (``ops.autograd.fused_experts_train``), which keeps c1 [T·k, N1] (x's dtype) for the backward.
"""
from __future__ import annotations

import torch

from .calls import FUSED_EXPERTS_TRAIN, op
from .spec import check_trainable  # the constructor's check, with the layer's other argument checks

#: the parameters a trainable layer may train (the weights only when unquantized)
TRAINABLE = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def set_trainable(layer, trainable: bool = True) -> list[str]:
    """Set ``requires_grad`` on the ``FusedMoE`` ``layer``'s trainable parameters; returns their names.

    Quantized weights are frozen (their gradient is an error in the ops), so a quantized layer trains its
    biases only; scales and the routing correction bias never train."""
    names = []
    for name in TRAINABLE:
        p = getattr(layer, name, None)
        if p is None or (layer.quant_config is not None and name in ("w13_weight", "w2_weight")):
            continue
        p.requires_grad_(trainable)
        names.append(name)
    return names


def saving(save_activations: bool) -> bool:
    """Whether a forward takes the saving path: ``save_activations`` and a backward may follow."""
    return save_activations and torch.is_grad_enabled()


def run_experts_saving(layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The ``FusedMoE`` ``layer``'s experts call through the saving forward: x [N, H], topk_weights [N, k] fp32,
    topk_ids [N, k] -> [N, H]. The backward then reuses c1 instead of recomputing GEMM1 (2·k·N1 bytes per token
    in bf16)."""
    s = layer.spec
    out, _c1 = op(FUSED_EXPERTS_TRAIN)(
        x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, activation=s.activation,
        quant_scheme=s.quant_scheme, w13_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale,
        w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, block_shape=s.block_shape, expert_map=layer.expert_map,
        apply_router_weight_on_input=s.apply_router_weight_on_input, activation_alpha=s.activation_alpha,
        activation_limit=s.activation_limit, batch_invariant=layer.invariant())
    return out


__all__ = ["TRAINABLE", "check_trainable", "run_experts_saving", "saving", "set_trainable"]
