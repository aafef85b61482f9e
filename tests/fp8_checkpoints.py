"""Pre-quantized fp8 pieces of a small layer, shared by tests/layer/loading/test_prequantized.py and
tests/checkpoint/test_formats.py: the float weights, the package's own quantizer and a Hugging Face fp8
checkpoint of one layer (DeepSeek-style block ``weight_scale_inv``, compressed-tensors-style ``weight_scale``)."""
from __future__ import annotations

import torch

import torch_moe_ops as moe
from torch_moe_ops import Fp8Config

E, K, H, I = 5, 2, 100, 64  # E not a power of two; H not a multiple of the 32-wide tiles (partial K tiles)
BLOCK = Fp8Config("block", block_shape=(32, 32))
CONFIGS = {"block": BLOCK, "channel": Fp8Config("channel"), "tensor": Fp8Config("tensor")}


def weights(seed=0, E=E, H=H, I=I):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, *shape, generator=g) / 10 for shape in ((I, H), (I, H), (H, I))]  # w1, w3, w2


def quantize(w: torch.Tensor, qc):
    """The package's own quantizer, one projection [N, K] (or [E, N, K]) at a time: (q e4m3, scale)."""
    return moe.quantize_weight(w, qc.weight_scheme, block_shape=qc.kernel_block_shape)


SUFFIX = {"block": "weight_scale_inv", "channel": "weight_scale", "tensor": "weight_scale"}


def checkpoint(ws, qc, *, input_scales=False, router=True):
    """A Hugging Face fp8 checkpoint of one layer: DeepSeek-style block ``weight_scale_inv``
    ``[ceil(N/bn), ceil(K/bk)]``, compressed-tensors-style per-channel ``weight_scale`` ``[N, 1]`` or a scalar
    per-tensor ``weight_scale``, with bf16 router weights."""
    scheme, sd = qc.quant_scheme.weight.name.removeprefix("fp8_"), {}
    P = "model.layers.0.mlp."
    if router:
        sd[P + "gate.weight"] = (torch.randn(ws[0].shape[0], ws[0].shape[2]) / 4).to(torch.bfloat16)
    for e in range(ws[0].shape[0]):
        for proj, w in zip(("gate_proj", "up_proj", "down_proj"), ws):
            q, s = quantize(w[e], qc)
            s = s[:, None] if scheme == "channel" else s.reshape(()) if scheme == "tensor" else s
            sd[f"{P}experts.{e}.{proj}.weight"] = q
            sd[f"{P}experts.{e}.{proj}.{SUFFIX[scheme]}"] = s
            if input_scales:
                sd[f"{P}experts.{e}.{proj}.input_scale"] = torch.tensor(0.02)
    return sd
