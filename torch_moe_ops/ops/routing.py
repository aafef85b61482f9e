"""``moe::topk_route``: scoring, correction bias, grouped top-k, renormalize, routed scaling (docs/design.md §4).

Its signature is written once (``TOPK_ROUTE``, docs/design.md §8.3); ``fused_moe`` shares ``ROUTING_OPTIONS``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import reference
from ..schemes import SCORING_FUNCS
from . import _checks as C
from ._registry import use_triton_on_cpu
from .decompose import decompose
from .signature import Signature, args

#: The routing options of ``topk_route`` and ``fused_moe`` (then ``routed_scaling_factor``: keyword-only here).
ROUTING_OPTIONS = args('bool renormalize=True, str scoring_func="softmax", int num_expert_group=0, int topk_group=0, '
                       "Tensor? e_score_correction_bias=None")
TOPK_ROUTE = Signature("topk_route", args("Tensor router_logits, int top_k") + ROUTING_OPTIONS
                       + args("*, float routed_scaling_factor=1.0"), "(Tensor topk_weights, Tensor topk_ids)")
SCHEMA = TOPK_ROUTE.schema


def check_routing(router_logits, top_k, scoring_func, num_expert_group, topk_group, e_score_correction_bias) -> None:
    C.check_tensor(router_logits, "router_logits", dim=2, dtypes=C.FLOAT_DTYPES, last_contiguous=True)
    E = router_logits.shape[1]
    C.check(top_k >= 1, f"top_k must be >= 1, got {top_k}")
    C.check(top_k <= E, f"top_k ({top_k}) must be <= the number of experts in router_logits ({E})")
    C.check(scoring_func in SCORING_FUNCS, f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if num_expert_group > 0 or topk_group > 0:
        G, kG = num_expert_group, topk_group
        C.check(G > 0, f"topk_group={kG} needs num_expert_group > 0")
        C.check(E % G == 0, f"num_expert_group ({G}) must divide the number of experts ({E})")
        C.check(E > G, f"the number of experts ({E}) must exceed num_expert_group ({G})")
        C.check(1 <= kG <= G, f"topk_group must be in [1, num_expert_group={G}], got {kG}")
        C.check(top_k <= kG * (E // G), f"top_k ({top_k}) exceeds the experts in topk_group={kG} groups ({kG * (E // G)})")
    if e_score_correction_bias is not None:
        C.check_tensor(e_score_correction_bias, "e_score_correction_bias", dim=1, dtypes=C.FLOAT_DTYPES, contiguous=True)
        C.check_shape(e_score_correction_bias, "e_score_correction_bias", (E,), " (one per expert of router_logits)")
        C.check_same_device(router_logits=router_logits, e_score_correction_bias=e_score_correction_bias)


def check_bias_values(bias) -> None:
    """A NaN bias would silently change which experts win (checked on CPU; on CUDA under debug)."""
    if bias is not None:
        C.check_finite(bias, "e_score_correction_bias")


def route(router_logits, top_k, renormalize, scoring_func, num_expert_group, topk_group, bias, rsf, on_triton: bool):
    """Checked routing on real tensors; ``on_triton`` picks the Triton launcher over the reference."""
    check_routing(router_logits, top_k, scoring_func, num_expert_group, topk_group, bias)
    check_bias_values(bias)
    if on_triton:
        from .._kernels import routing as kernels

        return kernels.topk_route(router_logits, top_k, renormalize, scoring_func, num_expert_group, topk_group, bias, rsf)
    return reference.topk_route(router_logits, top_k, renormalize, scoring_func, num_expert_group, topk_group, bias, rsf)


def _route(a, on_triton: bool):
    return route(a.router_logits, a.top_k, a.renormalize, a.scoring_func, a.num_expert_group, a.topk_group,
                 a.e_score_correction_bias, a.routed_scaling_factor, on_triton)


def _route_fake(a):
    check_routing(a.router_logits, a.top_k, a.scoring_func, a.num_expert_group, a.topk_group,
                  a.e_score_correction_bias)
    T = a.router_logits.shape[0]
    return (a.router_logits.new_empty((T, a.top_k), dtype=torch.float32),
            a.router_logits.new_empty((T, a.top_k), dtype=torch.int32))


def _route_cuda(a):
    return _route(a, True)


_topk_route = TOPK_ROUTE.define(cuda=_route_cuda, cpu=lambda a: _route(a, use_triton_on_cpu()),
                                fake=_route_fake)
decompose(_topk_route, TOPK_ROUTE, _route)


_TOPK_ROUTE_DOC = """Pick ``top_k`` experts per token.

    Args:
        router_logits: [T, E] bf16/fp16/fp32, scored in fp32. NaN counts as -inf, +-Inf as +-FLT_MAX.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide the k weights by their sum.
        scoring_func: ``"softmax"`` or ``"sigmoid"``.
        num_expert_group, topk_group: grouped top-k (DeepSeek): keep the ``topk_group`` best of
            ``num_expert_group`` groups, then pick ``top_k`` inside them. 0 disables.
        e_score_correction_bias: [E] float; added to the scores for selection only.
        routed_scaling_factor: multiplies the final weights (every mode).

    Returns:
        topk_weights: [T, k] fp32; topk_ids: [T, k] int32 in [0, E). Ties go to the lower id.
    """

# The public function is generated (``Signature.wrapper``): static type checkers and IDEs cannot see its
# parameters, so for them the same parameters are written out as a plain stub, pinned to the generated function
# by tests/ops/test_static_signatures.py. At runtime only the ``else`` branch runs.
if TYPE_CHECKING:
    def topk_route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring_func: str = "softmax",
                   num_expert_group: int = 0, topk_group: int = 0, e_score_correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick ``top_k`` experts per token -> (topk_weights [T, k] fp32, topk_ids [T, k] int32).
        ``help(topk_route)`` documents the arguments."""
        ...
else:
    #: ``topk_route(router_logits, top_k, *, renormalize=True, scoring_func="softmax", ...)``
    topk_route = TOPK_ROUTE.wrapper(2, _TOPK_ROUTE_DOC, __name__, cuda=_route_cuda)
