"""Shared pieces of the layer and checkpoint tests: a small MoE model, synthetic Hugging Face checkpoints, and a
live tensor-byte counter for CPU peak-memory checks."""
from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torch_moe_ops.layer import FusedMoE
from torch_moe_ops.quantization import Fp8Config, Int8WeightOnlyConfig

#: every quant config the layer supports (None = full precision), with short ids for parametrize
SCHEMES = {
    "none": None,
    "fp8_tensor": Fp8Config("tensor"),
    "fp8_channel": Fp8Config("channel"),
    "fp8_block": Fp8Config("block", block_shape=(32, 32)),
    "int8_w8a16": Int8WeightOnlyConfig(),
}
QUANT_SCHEMES = {k: v for k, v in SCHEMES.items() if v is not None}


class Block(nn.Module):
    """One decoder MoE block as user code writes it: a router ``gate`` sibling of ``experts``."""

    def __init__(self, E, k, H, I, **kw):
        super().__init__()
        dtype = kw.get("params_dtype", torch.bfloat16)
        self.gate = nn.Linear(H, E, bias=False, dtype=dtype, device=kw.get("device"))
        self.experts = FusedMoE(E, k, H, I, **kw)

    def forward(self, x):
        return self.experts(x, self.gate(x))


class MoEModel(nn.Module):
    """``layers.{L}.gate`` / ``layers.{L}.experts``, residual adds; checkpoints use ``model.layers.{L}.mlp.*``."""

    def __init__(self, num_layers=2, E=8, k=2, H=64, I=48, **kw):
        super().__init__()
        self.layers = nn.ModuleList([Block(E, k, H, I, **kw) for _ in range(num_layers)])
        self.requires_grad_(False)

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return x


def expert_tensors(E, H, I, *, gated=True, seed=0, dtype=torch.float32, scale=0.1):
    """Per-expert full-precision weights: (w1 [E, I, H], w3 [E, I, H] or None, w2 [E, H, I])."""
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, I, H, generator=g) * scale).to(dtype)
    w3 = (torch.randn(E, I, H, generator=g) * scale).to(dtype) if gated else None
    w2 = (torch.randn(E, H, I, generator=g) * scale).to(dtype)
    return w1, w3, w2


def hf_checkpoint(num_layers=2, E=8, H=64, I=48, *, style="qwen", seed=0, dtype=torch.float32, router=True,
                  gated=True, correction_bias=False):
    """A synthetic Hugging Face state dict. ``style``: ``qwen`` (gate_proj/up_proj/down_proj), ``mixtral``
    (block_sparse_moe ... w1/w3/w2) or ``fused`` (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""
    sd = {}
    for layer in range(num_layers):
        w1, w3, w2 = expert_tensors(E, H, I, gated=gated, seed=seed * 1000 + layer, dtype=dtype)
        block = f"model.layers.{layer}." + ("block_sparse_moe" if style == "mixtral" else "mlp")
        if router:
            g = torch.Generator().manual_seed(seed * 1000 + layer + 500)
            sd[f"{block}.gate.weight"] = (torch.randn(E, H, generator=g) * 0.5).to(dtype)
        if correction_bias:
            sd[f"{block}.gate.e_score_correction_bias"] = torch.rand(E) * 0.1
        if style == "fused":
            sd[f"{block}.experts.gate_up_proj"] = torch.cat([w1, w3], 1) if gated else w1
            sd[f"{block}.experts.down_proj"] = w2
            continue
        names = ("w1", "w3", "w2") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(E):
            if gated:
                sd[f"{block}.experts.{e}.{names[0]}.weight"] = w1[e]
                sd[f"{block}.experts.{e}.{names[1]}.weight"] = w3[e]
            else:
                sd[f"{block}.experts.{e}.{names[1]}.weight"] = w1[e]  # non-gated: up_proj is the only input proj
            sd[f"{block}.experts.{e}.{names[2]}.weight"] = w2[e]
    return sd


def loaded_model(sd, *, num_layers=2, E=8, k=2, H=64, I=48, **kw):
    from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint

    model = MoEModel(num_layers, E, k, H, I, **kw)
    load_checkpoint(model, sd, progress=False)
    finalize_loading(model)
    return model


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def param_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages on ``device`` allocated by ops run under this mode.

    A storage counts from the op that allocated it (an output whose storage none of the op's inputs share,
    so views and in-place results are not counted twice) until it is freed (polled through weak refs after
    every op). ``peak`` is the high-water mark. Tensors created outside the mode (the checkpoint) are not
    counted; temporaries inside a single custom-op call (e.g. one ``quantize_weight_into``) are freed before
    the op returns and are not seen either."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _prune(self):
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._prune()
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == self.device}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in inputs or ref.cdata in self.live:
                continue
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def settle(self) -> int:
        """Prune freed storages now; returns the live byte count."""
        self._prune()
        return self.current
