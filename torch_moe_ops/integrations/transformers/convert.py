"""Turning a planned block's expert tensors into a ``FusedMoE`` (used by ``patch`` and ``from_pretrained``).

- ``move_experts``: no quant config. The block's own storage becomes the layer's (no copy); a transposed
  layout (GPT-OSS, Llama-4) is transposed in place one expert at a time through a one-expert scratch.
  The layer is built on the meta device and given the tensors with ``load_state_dict(assign=True)``, which
  ``FusedMoE`` counts as a complete load (docs/design.md §10).
- ``quantize_experts``: with a quant config. The layer's quantized storage is allocated at construction and
  filled expert by expert through ``weight_loader`` (online quantization, docs/design.md §10).
- ``assign``: hand final tensors (e.g. a pre-quantized checkpoint's) to a meta-built layer.
"""
from __future__ import annotations

import torch

from ...layer import FusedMoE
from .models import BlockPlan


def build_layer(plan: BlockPlan, quant_config, device, params_dtype: torch.dtype) -> FusedMoE:
    """The ``FusedMoE`` of ``plan`` (raises ``ValueError`` / ``TypeError`` for a config it cannot take)."""
    return FusedMoE(**plan.moe, params_dtype=params_dtype, quant_config=quant_config, device=device)


def check_shapes(layer: FusedMoE, shapes: dict[str, tuple]) -> None:
    """``ValueError`` unless every ``name -> shape`` is the shape of that parameter of ``layer``."""
    for name, shape in shapes.items():
        want = getattr(layer, name)
        if want is None or tuple(want.shape) != tuple(shape):
            expected = None if want is None else list(want.shape)
            raise ValueError(f"{layer.layer_name or 'FusedMoE'}: {name} must be {expected}, got {list(shape)}")


def assign(layer: FusedMoE, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` the parameters of a meta-built ``layer`` (no copy; shapes are checked)."""
    check_shapes(layer, {n: t.shape for n, t in tensors.items()})
    layer.load_state_dict(tensors, strict=True, assign=True)  # the layer re-attaches its weight loaders


def transpose_experts_(t: torch.Tensor) -> torch.Tensor:
    """t: [E, A, B] contiguous -> the same storage as [E, B, A], each expert transposed in place.

    Expert e occupies the same bytes in both layouts, so one expert's scratch copy suffices."""
    E, A, B = t.shape
    out = t.view(E, B, A)
    for e in range(E):
        out[e].copy_(t[e].t().contiguous())
    return out


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.data if t.is_contiguous() else t.data.contiguous()


def move_experts(plan: BlockPlan) -> FusedMoE:
    """A full-precision ``FusedMoE`` whose weights are the block's own tensors (see the module docstring)."""
    ex = plan.experts
    layer = build_layer(plan, None, "meta", plan.dtype)
    tensors = {"w13_weight": _own(ex.w13), "w2_weight": _own(ex.w2)}
    if ex.w13_bias is not None:
        tensors.update(w13_bias=_own(ex.w13_bias), w2_bias=_own(ex.w2_bias))
    if plan.correction_bias is not None:
        tensors["e_score_correction_bias"] = _own(plan.correction_bias).reshape(-1)
    flip = ("w13_weight", "w2_weight") if ex.transposed else ()
    # every check before the in-place transposition: a refused block keeps its layout
    check_shapes(layer, {n: (t.shape[0], t.shape[2], t.shape[1]) if n in flip else t.shape for n, t in tensors.items()})
    for n in flip:
        tensors[n] = transpose_experts_(tensors[n])
    assign(layer, tensors)
    return layer


def quantize_experts(plan: BlockPlan, quant_config, device) -> FusedMoE:
    """A quantized ``FusedMoE`` on ``device`` filled expert by expert from the block's tensors (any device)."""
    ex = plan.experts
    layer = build_layer(plan, quant_config, device, plan.dtype)
    for e in range(plan.num_experts):
        layer.weight_loader("w13_weight", ex.expert_w13(ex.w13.data[e]), None, e, transposed=False)
        layer.weight_loader("w2_weight", ex.expert_w2(ex.w2.data[e]), "w2", e, transposed=False)
        if ex.w13_bias is not None:
            layer.weight_loader("w13_bias", ex.w13_bias.data[e], None, e)
            layer.weight_loader("w2_bias", ex.w2_bias.data[e], "w2", e)
    if plan.correction_bias is not None:
        layer.weight_loader("e_score_correction_bias", plan.correction_bias.data.reshape(-1).float(), None, None)
    layer.finalize_loading()
    return layer


def layer_nbytes(layer: FusedMoE) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))


def experts_nbytes(plan: BlockPlan) -> int:
    ex = plan.experts
    ts = [t for t in (ex.w13, ex.w2, ex.w13_bias, ex.w2_bias) if t is not None]
    return sum(t.numel() * t.element_size() for t in ts)
