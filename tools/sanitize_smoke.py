"""A small run of every kernel, for ``compute-sanitizer --tool memcheck python tools/sanitize_smoke.py``."""
import torch

import torch_moe_ops as moe
from torch_moe_ops.demo import SCHEMES
from torch_moe_ops.testing import random_moe_weights

torch.manual_seed(0)
T, E, k, H, I = 37, 12, 3, 136, 88
x = (torch.randn(T, H, device="cuda") * 0.1).bfloat16()
logits = torch.randn(T, E, device="cuda")
w13, w2, b13, b2 = random_moe_weights(E, H, I, device="cuda", bias=True)
with torch.inference_mode():
    w, ids = moe.topk_route(logits, k, num_expert_group=4, topk_group=2, e_score_correction_bias=torch.randn(E, device="cuda"))
    moe.align_block_size(ids, E, 16)
    emap = torch.full((E,), -1, dtype=torch.int32, device="cuda")
    emap[::2] = torch.arange(E // 2, dtype=torch.int32, device="cuda")
    moe.align_block_size(ids, E, 16, expert_map=emap)
    moe.act_and_mul(torch.randn(T, 2 * I, device="cuda").bfloat16(), "swigluoai", limit=7.0)
    moe.moe_sum(torch.randn(T, k, H, device="cuda").bfloat16())
    moe.quantize_activation(x, "fp8_group", group_size=64)
    for scheme, (wscheme, shards) in SCHEMES.items():
        kw = {}
        q13, q2 = w13, w2
        if wscheme:
            q13, s13 = moe.quantize_weight(w13, wscheme, shards=shards)
            q2, s2 = moe.quantize_weight(w2, wscheme)
            kw = dict(quant_scheme=scheme, w13_scale=s13, w2_scale=s2)
        moe.fused_moe(x, logits, q13, q2, k, w13_bias=b13, w2_bias=b2, **kw)
        moe.fused_experts(x, q13[: E // 2], q2[: E // 2], w, ids, expert_map=emap, **kw if not kw else
                          dict(kw, w13_scale=kw["w13_scale"][: E // 2], w2_scale=kw["w2_scale"][: E // 2]))
torch.cuda.synchronize()
print("sanitize smoke done")
