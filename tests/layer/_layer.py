"""A small loaded ``FusedMoE`` and its inputs, shared by test_inputs.py, test_weights.py and test_storage.py:
every quant config, odd E, H != I (no square experts), int4 groups of 32."""
import torch

from torch_moe_ops import Fp8Config, FusedMoE, Int4Config, Int8Config
from torch_moe_ops.testing import random_moe_weights

E, K, H, I = 5, 2, 96, 32  # E odd, H not a power of two, H != I (no square experts); int4 groups of 32
CONFIGS = {"none": None, "fp8_tensor": Fp8Config("tensor"), "fp8_channel": Fp8Config("channel"),
           "fp8_block": Fp8Config("block", block_shape=(32, 32)), "int8": Int8Config(), "int4": Int4Config(32)}
QUANT = [n for n in CONFIGS if n != "none"]
NAME = "model.layers.3.mlp.experts"


def _loaded(qc=None, *, dtype=torch.bfloat16, **kw):
    layer = FusedMoE(E, K, H, I, quant_config=qc, params_dtype=dtype, **kw)
    layer.layer_name = NAME
    w13, w2, b13, b2 = random_moe_weights(E, H, I, bias=layer.has_bias)
    layer.load_weights(w13, w2, w13_bias=b13, w2_bias=b2,
                       e_score_correction_bias=torch.rand(E) if layer.use_correction_bias else None)
    return layer


def _x(*lead, dtype=torch.bfloat16):
    return torch.randn(*lead, H, dtype=dtype) / 2, torch.randn(*lead, E)
