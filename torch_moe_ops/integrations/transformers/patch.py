"""``patch(model, quant_config)``: replace every sparse-MoE block of a loaded transformers model in place.

Two phases, so that no block is ever half-replaced: (1) plan every block and build its ``FusedMoE`` on the
meta device, which runs every check (sizes, activation, routing, the quant config); a block that fails is
left alone and named in the report, a quant config that fails raises before anything changed. (2) convert
block by block: build the layer, move or quantize the experts, swap the block into its parent, free the
block's full-precision expert storage.

Memory (quantized): a layer's quantized storage is allocated while the block's full-precision experts
still exist. Blocks already converted have freed more than that (fp8 / int8 / int4 are at most half of
bf16), so only when those savings do not cover the next layer is the block's full-precision storage first
moved to host memory (CUDA) and streamed back one expert at a time. Peak device memory stays within the
model before patching + 2 experts + 64 MiB. On CPU the host is the device: the first quantized block
needs its quantized size on top (see docs/transformers.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import _modes
from ...schemes.configs import check_quant_config
from .block import MoEBlock
from .convert import build_layer, experts_nbytes, layer_nbytes, move_experts, quantize_experts
from .models import PLANNERS, BlockPlan, Unsupported, looks_like_moe, plan_block

_SLACK = 64 << 20  #: bytes of headroom the memory bound allows beyond two experts


@dataclass
class PatchReport:
    """What ``patch`` / ``from_pretrained`` did.

    replaced: block path -> ``"<HF class> -> MoEBlock(...)"``. skipped: block path -> why it was left as is.
    quant_scheme: the experts' ``quant_scheme`` (``none`` for full precision). offloaded: blocks whose
    full-precision experts went through host memory. notes: anything else worth knowing (one line each).
    expert_bytes_before / after: routed-expert storage of the replaced blocks before and after."""

    replaced: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    quant_scheme: str = "none"
    offloaded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expert_bytes_before: int = 0
    expert_bytes_after: int = 0
    loading: dict = field(default_factory=dict)  #: from_pretrained only: files, tensors, bytes, ignored names

    def __str__(self) -> str:
        mib = 2**20
        lines = [f"torch_moe_ops: replaced {len(self.replaced)} MoE blocks ({self.quant_scheme}; routed experts "
                 f"{self.expert_bytes_before / mib:.1f} -> {self.expert_bytes_after / mib:.1f} MiB), "
                 f"left {len(self.skipped)} unchanged"]
        lines += [f"  replaced {p}: {d}" for p, d in self.replaced.items()]
        lines += [f"  NOT replaced {p}: {why}" for p, why in self.skipped.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ discovery
def find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module, BlockPlan]], dict[str, str], list[str]]:
    """(planned blocks [(path, block, plan)], unsupported {path: reason}, already replaced paths)."""
    planned, unsupported, done = [], {}, []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue  # inside a block already found
        if isinstance(module, MoEBlock):
            done.append(path)
            claimed.append(path)
            continue
        try:
            plan = plan_block(module)
        except Unsupported as exc:
            if type(module).__name__ in PLANNERS or looks_like_moe(module):
                unsupported[path] = f"{type(module).__name__}: {exc}"
                claimed.append(path)
            continue
        planned.append((path, module, plan))
        claimed.append(path)
    return planned, unsupported, done


def _check_layer(plan: BlockPlan, quant_config) -> None:
    """Build the layer on the meta device: every size / routing / quant-config check, no memory."""
    try:
        build_layer(plan, quant_config, "meta", plan.dtype)
    except (ValueError, TypeError) as exc:
        raise Unsupported(str(exc)) from None


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _free(plan: BlockPlan) -> None:
    """Drop the replaced block's expert storage now, even if the caller still holds the old block."""
    ex = plan.experts
    for t in (ex.w13, ex.w2, ex.w13_bias, ex.w2_bias):
        if t is not None:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def record_router_logits(model: nn.Module, block: MoEBlock) -> bool:
    """Let ``output_router_logits=True`` see this block's router logits, as it saw the replaced router's
    (transformers records them with a forward hook on its router class). False when transformers has no
    such hook for this model."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        return False
    owners = [m for m in model.modules() if "router_logits" in (getattr(type(m), "_can_record_outputs", None) or {})]
    if not owners:
        return False
    install_output_capuring_hook(block.router_linear(), "router_logits", 0)
    return True


# ------------------------------------------------------------------------------------------ patch
@torch.no_grad()
def patch(model: nn.Module, quant_config=None, *, strict: bool = False, offload: bool | None = None,
          batch_invariant: bool | None = None) -> PatchReport:
    """Replace, in place, every sparse-MoE block of ``model`` (router, experts, shared experts and their
    gate) by a ``MoEBlock`` computing the same function with torch_moe_ops.

    Args:
        model: a loaded transformers model (any module tree containing supported blocks).
        quant_config: None (keep the experts' dtype, no copy), ``Fp8Config(...)``, ``Int8Config()`` or
            ``Int4Config(...)``, or a scheme name (``"fp8_block"``, ``"int8_w8a16"``, ``"int4_w4a16"``, ...):
            the experts are quantized one by one and their full-precision storage freed.
        strict: raise instead of reporting blocks that cannot be replaced.
        offload: None (automatic, see the module docstring), True (always stream quantized blocks through
            host memory) or False (never).
        batch_invariant: every new layer's ``FusedMoE.batch_invariant`` (None: follow
            ``torch_moe_ops.batch_invariant()``; docs/batch-invariance.md says what it covers in a model).

    Returns:
        ``PatchReport``. Raises ``ValueError`` when the model has no MoE block, or naming the block when the
        quant config cannot be used for it (before any block is changed).
    """
    quant_config = check_quant_config(quant_config)
    _modes.resolve(batch_invariant)  # TypeError before any block changes
    planned, unsupported, done = find_blocks(model)
    report = PatchReport(skipped=dict(unsupported))
    if not planned and not done and not unsupported:
        raise ValueError(f"{type(model).__name__} contains no sparse-MoE block that torch_moe_ops knows; supported "
                         f"blocks: {sorted(PLANNERS)}")
    if quant_config is not None:
        report.quant_scheme = quant_config.quant_scheme.name
    meta = [path for path, _, plan in planned if plan.experts.w13.is_meta]
    if meta:
        raise ValueError(f"the experts of {meta[:3]} are on the meta device (no weights to move or quantize); build "
                         "the model with torch_moe_ops.integrations.transformers.from_pretrained, which streams them "
                         "from the checkpoint, or load the model's weights before patching")
    ok = []
    for path, block, plan in planned:
        try:
            _check_layer(plan, None)
        except Unsupported as exc:
            report.skipped[path] = f"{plan.block_class}: {exc}"
            continue
        if quant_config is not None:
            try:
                build_layer(plan, quant_config, "meta", plan.dtype)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path} ({plan.block_class}): quant_config {quant_config} cannot be used: {exc}") \
                    from None
        ok.append((path, block, plan))
    if report.skipped and strict:
        raise Unsupported("cannot replace: " + "; ".join(f"{p}: {why}" for p, why in report.skipped.items()))
    if done:
        report.notes.append(f"{len(done)} blocks were already torch_moe_ops MoEBlocks: {done}")
        if batch_invariant is not None:  # a second patch(..., batch_invariant=...) still sets the flag
            for path in done:
                model.get_submodule(path).experts.batch_invariant = batch_invariant
    savings = 0
    for path, block, plan in ok:
        before = experts_nbytes(plan)
        layer, offloaded = _convert(plan, quant_config, savings, offload)
        layer.batch_invariant = batch_invariant
        new = MoEBlock(plan, layer)
        new.train(block.training)
        layer.layer_name = f"{path}.experts"
        _set_child(model, path, new)
        _free(plan)
        after = layer_nbytes(layer)
        savings += before - after if quant_config is not None else 0
        report.expert_bytes_before += before
        report.expert_bytes_after += after
        report.replaced[path] = f"{plan.block_class} -> MoEBlock({plan.describe()}, {report.quant_scheme})"
        if offloaded:
            report.offloaded.append(path)
        if not record_router_logits(model, new) and path == ok[0][0]:
            report.notes.append("router logits are not recorded (output_router_logits) for this model")
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return report


def _convert(plan: BlockPlan, quant_config, savings: int, offload: bool | None):
    """(FusedMoE, offloaded?) for one block; on failure the block's tensors are back where they were."""
    if quant_config is None:
        return move_experts(plan), False
    ex = plan.experts
    dev = ex.w13.device
    need = layer_nbytes(build_layer(plan, quant_config, "meta", plan.dtype))
    if offload is None:
        offload = dev.type != "cpu" and need > savings + _SLACK
    moved = [t for t in (ex.w13, ex.w2, ex.w13_bias, ex.w2_bias) if t is not None] if offload else []
    for t in moved:
        t.data = t.data.to("cpu")
    try:
        return quantize_experts(plan, quant_config, dev), bool(moved)
    except BaseException:
        for t in moved:
            t.data = t.data.to(dev)
        raise
