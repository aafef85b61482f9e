"""The demo's pipeline: a synthetic Hugging Face-style bf16 MoE checkpoint (Qwen3-MoE names), a model built on
the meta device, streaming online quantization while loading, compile, run, reload in place."""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from .. import FusedMoE, _platform, finalize_loading, load_checkpoint, reload_weights
from ..quantization import Int4Config
from ..schemes import get_quant_scheme
from ..schemes.configs import DEFAULT_CONFIGS
from ..testing import fitting_block, sqnr_db, time_per_call

#: Every scheme's default config, and int4's smaller groups; ``quant_config`` picks the one of a scheme whose
#: tile suits H and I.
_CONFIGS = (*DEFAULT_CONFIGS.values(), Int4Config(group_size=64), Int4Config(group_size=32))


def quant_config(name: str, H: int, I: int, flag: str = "--quant"):
    """A scheme name (of the ``flag`` option) -> the ``FusedMoE`` quant config (None for ``none``); int4
    takes the largest group that divides H and I."""
    try:
        scheme = get_quant_scheme(name)
    except ValueError as exc:
        raise SystemExit(f"{flag}: {exc}") from None
    if scheme.weight is None:
        return None
    try:
        block = fitting_block(scheme, H, I)
    except ValueError as exc:
        raise SystemExit(f"{flag}: {exc}") from None
    for cfg in _CONFIGS:
        if cfg.quant_scheme is scheme and cfg.block == block:
            return cfg
    raise SystemExit(f"{flag}: no FusedMoE config for {name!r} with H={H}, I={I}")


class MoEBlock(nn.Module):
    """``mlp.gate`` (router) and ``mlp.experts`` as in Qwen3-MoE."""

    def __init__(self, E, k, H, I, quant_config, device):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False, dtype=torch.bfloat16, device=device)
        self.experts = FusedMoE(E, k, H, I, quant_config=quant_config, device=device)

    def forward(self, x):
        return self.experts(x, self.gate(x))


class DemoModel(nn.Module):
    """``model.layers.{L}.mlp``: residual MoE blocks (attention left out: the MoE is what we show)."""

    def __init__(self, layers, E, k, H, I, quant_config=None, device=None):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(layers))
        for layer in self.model.layers:
            layer.mlp = MoEBlock(E, k, H, I, quant_config, device)
        self.requires_grad_(False)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.mlp(x)
        return x


def write_checkpoint(path: str, layers: int, E: int, H: int, I: int, seed: int) -> int:
    """One bf16 ``.safetensors`` file per layer with Qwen3-MoE names; returns the bytes written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    total = 0
    for L in range(layers):
        p = f"model.layers.{L}.mlp"
        tensors = {f"{p}.gate.weight": (torch.randn(E, H, generator=g) * H**-0.5).bfloat16()}
        for e in range(E):
            for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                # std 1/sqrt(fan_in): activations keep their scale through the residual stack at any H, I
                w = torch.randn(*shape, generator=g) * shape[1] ** -0.5
                tensors[f"{p}.experts.{e}.{name}.weight"] = w.bfloat16()
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(path, f"model-{L + 1:05d}-of-{layers:05d}.safetensors"))
    return total


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _load(args, ckpt, quant_config, device):
    if device.type == "cuda":  # measured from before the model exists: the peak includes its final storage
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = DemoModel(args.layers, args.experts, args.top_k, args.hidden, args.intermediate, quant_config, device)
    report = load_checkpoint(model, ckpt, progress=True)
    finalize_loading(model)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # CPU: the final storage plus the largest full-precision staging any layer held
        peak = _param_bytes(model) + max(m.peak_staging_bytes for m in model.modules() if isinstance(m, FusedMoE))
    return model, report, peak


def run_pipeline(args) -> int:
    device = torch.device(args.device)
    config = quant_config(args.quant, args.hidden, args.intermediate)
    x = (torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1)) * 0.5).bfloat16().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_a, ckpt_b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        os.makedirs(ckpt_a), os.makedirs(ckpt_b)
        ckpt_bytes = write_checkpoint(ckpt_a, args.layers, args.experts, args.hidden, args.intermediate, seed=0)
        print(f"\nPipeline: {args.layers}-layer Qwen3-MoE-style checkpoint ({ckpt_bytes / 2**20:.1f} MiB bf16) -> "
              f"meta-device model -> streaming {args.quant} load ({config!r}) on {_platform.describe(device)}")
        model, report, peak = _load(args, ckpt_a, config, device)
        ref, _, _ = _load(args, ckpt_a, None, device)
        print(f"loaded {len(report.loaded)} tensors, ignored {len(report.ignored)}")
        with torch.inference_mode():
            rows, h = [], x
            for L, (q_layer, r_layer) in enumerate(zip(model.model.layers, ref.model.layers)):
                rows.append((L, sqnr_db(r_layer.mlp(h).float(), q_layer.mlp(h).float())))
                h = h + r_layer.mlp(h)
            compiled = torch.compile(model, fullgraph=True, dynamic=True)
            before = compiled(x)
            ms = time_per_call(lambda: compiled(x), args.iters, device) * 1e3
            full_sqnr = sqnr_db(ref(x).float(), before.float())
        fp_bytes = _param_bytes(ref)
        print(f"\n{'bf16 model':>14} {'quantized':>12} {'peak in load':>14} {'peak/final':>11} {'ms/forward':>11}")
        print(f"{fp_bytes / 2**20:>10.1f} MiB {_param_bytes(model) / 2**20:>8.1f} MiB "
              f"{peak / 2**20:>10.1f} MiB {peak / _param_bytes(model):>10.3f}x {ms:>11.3f}")
        print("SQNR vs the bf16 model, per layer (same input): "
              + ", ".join(f"L{L} {s:.1f} dB" for L, s in rows) + f"; whole model {full_sqnr:.1f} dB")

        ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
        write_checkpoint(ckpt_b, args.layers, args.experts, args.hidden, args.intermediate, seed=1)
        reload_weights(model, ckpt_b)
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled(x)  # a recompile here would raise
        moved = [n for n, p in model.named_parameters() if p.data_ptr() != ptrs[n]]
        changed = (after.double() - before.double()).norm() / before.double().norm()
        print(f"reload: output changed by {changed:.2f} (relative), parameters whose storage moved: "
              f"{len(moved)} of {len(ptrs)}; the compiled model ran the new weights without recompiling")
    return 0 if not moved and changed > 0 else 1
