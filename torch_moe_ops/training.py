"""Training helpers for ``FusedMoE`` (docs/training.md): which parameters train, and the experts call that saves
GEMM1's output for the backward instead of recomputing it.

The ops themselves are differentiable (``torch_moe_ops.ops.autograd``); a layer trains once its parameters
require grad. This module holds the layer-side rules so that ``layer.py`` only calls them:

- ``set_trainable(layer)``: ``w13_weight`` / ``w2_weight`` of an unquantized layer and both biases require
  grad; quantized weights, their scales and ``e_score_correction_bias`` (selection only) stay frozen.
- ``run_experts_saving(layer, x, topk_weights, topk_ids)``: the layer's ``fused_experts`` call through
  ``moe::_fused_experts_train``, which keeps c1 [T·k, N1] (x's dtype) for the backward.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (registers the ops)
from .ops import autograd as _autograd  # noqa: F401  (registers their autograd formulas)

#: the parameters a trainable layer may train (the weights only when unquantized)
TRAINABLE = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def check_trainable(trainable: bool, save_activations: bool, parallel) -> None:
    """Constructor checks of ``FusedMoE(trainable=..., save_activations=...)``."""
    if save_activations and not trainable:
        raise ValueError("save_activations=True only applies to trainable=True layers")
    if trainable and parallel is not None and parallel.world_size > 1:
        raise NotImplementedError("trainable=True with tensor / expert parallelism (world_size > 1) is not "
                                  "supported yet: the expert exchange is not differentiable (docs/training.md)")


def set_trainable(layer, trainable: bool = True) -> list[str]:
    """Set ``requires_grad`` on the layer's trainable parameters; returns their names.

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


def run_experts_saving(layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``layer._run_experts`` through the saving forward: x [N, H], topk_weights [N, k] fp32, topk_ids [N, k]
    -> [N, H]. The backward then reuses c1 instead of recomputing GEMM1 (2·k·N1 bytes per token in bf16)."""
    out, _c1 = torch.ops.moe._fused_experts_train(
        x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, layer.activation, layer.quant_scheme,
        layer.w13_weight_scale, layer.w2_weight_scale, layer.w13_bias, layer.w2_bias, layer.block_shape,
        layer.expert_map, apply_router_weight_on_input=layer.apply_router_weight_on_input,
        activation_alpha=layer.activation_alpha, activation_limit=layer.activation_limit)
    return out
