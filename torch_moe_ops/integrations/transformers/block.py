"""The module that replaces a transformers sparse-MoE block: router + ``FusedMoE`` + shared experts.

``MoEBlock`` keeps the replaced block's child names for everything that is not a routed expert (``gate`` or
``router``, ``shared_expert(s)``, ``shared_expert_gate``), so a checkpoint's router and shared-expert tensors
keep their names; the routed experts are the ``FusedMoE`` at ``experts``. Routing runs inside
``torch.ops.moe.fused_moe`` (docs/design.md §4), or through a named routing hook (``ROUTINGS``) and
``FusedMoE.forward_experts`` for routers that are not top-k (PhiMoE's SparseMixer). Inference only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...layer import FusedMoE
from ...reference.invariant import rowwise
from .models import BlockPlan


class Router(nn.Module):
    """The replaced block's router linear: ``forward(x [T, H], invariant=False) -> router_logits [T, E]``.

    weight: [E, H] (the block's own parameter, moved, not copied); bias: [E] or None. ``fp32``: logits in
    fp32 from fp32 inputs (DeepSeek-V3, GLM-4.5, Ernie keep their router in fp32), else in x's dtype.
    ``invariant`` (the experts' batch-invariant mode): ``moe::linear``, whose rows do not depend on the batch,
    instead of ``F.linear`` (cuBLAS picks kernels by T; docs/batch-invariance.md)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fp32: bool = False):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self.fp32 = fp32

    def forward(self, x: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        if self.fp32:
            x, w, b = x.float(), self.weight.float(), None if self.bias is None else self.bias.float()
        else:
            w, b = self.weight, self.bias
            x = x if x.dtype == w.dtype else x.to(w.dtype)  # (a same-dtype .to still costs ~1 µs eager)
        if invariant:
            return torch.ops.moe.linear(x.contiguous(), w, b, batch_invariant=True)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        E, H = self.weight.shape
        return f"hidden_size={H}, num_experts={E}, bias={self.bias is not None}, fp32={self.fp32}"


def sparsemixer(router_logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's SparseMixer in eval mode: router_logits [T, E] -> (topk_weights [T, 2] fp32, topk_ids [T, 2] int32).

    Expert 1 is the argmax; its weight is its softmax over the logits within ``2 * jitter_eps`` (relative)
    of the max. Expert 2 is the argmax once expert 1 is removed, weighted the same way among the rest.
    Static shapes only (compiles into the graph)."""
    s = router_logits.float()
    m1, i1 = s.max(dim=-1, keepdim=True)
    far1 = ((m1 - s) / s.abs().clamp(min=m1)) > 2 * jitter_eps
    w1 = torch.softmax(s.masked_fill(far1, float("-inf")), dim=-1).gather(-1, i1)
    rest = s.scatter(-1, i1, float("-inf"))
    m2, i2 = rest.max(dim=-1, keepdim=True)
    far2 = ((m2 - s) / s.abs().clamp(min=m2)) > 2 * jitter_eps
    w2 = torch.softmax(rest.masked_fill(far2, float("-inf")), dim=-1).gather(-1, i2)
    return torch.cat([w1, w2], -1), torch.cat([i1, i2], -1).to(torch.int32)


def invariant_mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A shared expert computed with batch-invariant rows, when it is the usual gated MLP
    (``down_proj(act(gate_proj(x)) * up_proj(x))``, ``nn.Linear`` projections, ``act_fn`` / ``activation_fn``):
    every product is ``moe::linear``; on CPU the activation runs by fixed row chunks (``rowwise``). None for any
    other module (it then runs as it is: outside the mode, docs/batch-invariance.md)."""
    projs = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    if act is None or not all(type(p) is nn.Linear for p in projs):
        return None
    gate, up, down = projs
    h = invariant_linear(gate, x)
    h = (rowwise(act, h) if h.device.type == "cpu" else act(h)) * invariant_linear(up, x)
    return invariant_linear(down, h)


def invariant_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for x [T, K] with batch-invariant rows (``moe::linear``)."""
    return torch.ops.moe.linear(x.to(linear.weight.dtype).contiguous(), linear.weight, linear.bias,
                                batch_invariant=True)


#: custom routing hooks: name -> fn(router_logits [T, E], **routing_args) -> (topk_weights [T, k], topk_ids [T, k])
ROUTINGS: dict[str, Callable] = {"sparsemixer": sparsemixer}


class MoEBlock(nn.Module):
    """``forward(hidden_states [..., H]) -> [..., H]`` (or the replaced block's tuple, see ``BlockPlan.output``).

    Children: the router (under the replaced block's name), ``experts`` (``FusedMoE``), and the shared
    expert modules of the replaced block (unchanged). ``experts`` is None only while ``from_pretrained`` is
    still loading."""

    def __init__(self, plan: BlockPlan, experts: FusedMoE | None):
        super().__init__()
        self.kind, self.replaced = plan.kind, plan.block_class  #: model kind and the replaced class, for reports
        self.router_attr = plan.router_attr
        setattr(self, plan.router_attr, Router(plan.router_weight, plan.router_bias, plan.router_fp32))
        self.experts = experts
        for name, module in plan.shared.items():
            setattr(self, name, module)
        self.shared_expert_name, self.shared_gate_name = plan.shared_expert, plan.shared_gate
        self.routing = plan.routing
        self.routing_args = dict(plan.routing_args)
        self.output = plan.output

    def router_linear(self) -> Router:
        """The router module (named ``gate`` or ``router`` like the replaced block's)."""
        return getattr(self, self.router_attr)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        experts = self.experts  # (each nn.Module attribute lookup costs ~1 µs eager)
        invariant = experts.invariant()
        logits = getattr(self, self.router_attr)(x, invariant)
        if self.routing is None:
            out = experts(x, logits)
        else:
            weights, ids = ROUTINGS[self.routing](logits, **self.routing_args)
            out = experts.forward_experts(x, weights, ids)
        if self.shared_expert_name is not None:
            out = out + self._shared(x, invariant)
        if self.output == "flat_pair":
            return out, logits
        out = out.view(shape)
        return (out, None) if self.output == "pair" else out

    def _shared(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        """The shared expert(s) [T, H], gated when the block has a shared-expert gate; in the mode through
        ``invariant_mlp`` / ``invariant_linear`` where the modules are plain gated MLPs and linears."""
        mlp = getattr(self, self.shared_expert_name)
        shared = invariant_mlp(mlp, x) if invariant else None
        shared = mlp(x) if shared is None else shared.to(x.dtype)
        if self.shared_gate_name is not None:
            gate = getattr(self, self.shared_gate_name)
            g = invariant_linear(gate, x) if invariant and type(gate) is nn.Linear else gate(x)
            g = rowwise(torch.sigmoid, g) if invariant and g.device.type == "cpu" else torch.sigmoid(g)
            shared = g * shared
        return shared

    def extra_repr(self) -> str:
        extra = f", routing={self.routing!r}" if self.routing else ""
        return f"replaces={self.replaced}{extra}"
