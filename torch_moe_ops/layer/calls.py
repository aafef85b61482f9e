"""The ops ``FusedMoE`` calls, each as a pair of objects: the op's public Python function and its
``torch.ops.moe`` overload packet.

``op(pair)`` picks one per call: the public function in eager, which calls the CUDA kernel itself when the
dispatcher would do nothing else (docs/host-overhead.md), and the overload packet under Dynamo (a Python
function there would be one more frame for Dynamo to compile after a graph break).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..ops import fused_experts, fused_moe, topk_route
from ..ops._registry import mark_traced
from ..ops.autograd import fused_experts_train


class OpPair(NamedTuple):
    """One op: ``eager`` its public function, ``traced`` its ``torch.ops.moe`` overload packet."""

    eager: Callable
    traced: Callable


FUSED_MOE = OpPair(fused_moe, torch.ops.moe.fused_moe)
FUSED_EXPERTS = OpPair(fused_experts, torch.ops.moe.fused_experts)
TOPK_ROUTE = OpPair(topk_route, torch.ops.moe.topk_route)
#: the saving forward of ``save_activations`` layers: returns (out, c1) (training.py)
FUSED_EXPERTS_TRAIN = OpPair(fused_experts_train, torch.ops.moe._fused_experts_train)


def op(pair: OpPair) -> Callable:
    """``pair.traced`` while Dynamo traces (the graph then also carries ``mark_traced``'s state), else
    ``pair.eager``."""
    if torch.compiler.is_compiling():
        mark_traced()
        return pair.traced
    return pair.eager


__all__ = ["FUSED_EXPERTS", "FUSED_EXPERTS_TRAIN", "FUSED_MOE", "TOPK_ROUTE", "OpPair", "op"]
