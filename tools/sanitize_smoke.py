"""A small run of every kernel, for ``compute-sanitizer --tool memcheck python tools/sanitize_smoke.py``.

Every quant scheme of the registry runs fused_moe and an expert-parallel fused_experts (half the experts
local); int4 groups must divide H and I, so int4 gets its own (still unaligned to the tiles) sizes."""
import torch

import torch_moe_ops as moe
from torch_moe_ops.schemes import QUANT_SCHEMES
from torch_moe_ops.testing import experts_kwargs, quantize_experts, random_moe_weights

torch.manual_seed(0)
T, E, k = 37, 12, 3
DIMS = {"int4_w4a16": (160, 96)}  # (H, I): multiples of the [1, 32] group; the others use (136, 88)
logits = torch.randn(T, E, device="cuda")
with torch.inference_mode():
    w, ids = moe.topk_route(logits, k, num_expert_group=4, topk_group=2, e_score_correction_bias=torch.randn(E, device="cuda"))
    moe.align_block_size(ids, E, 16)
    emap = torch.full((E,), -1, dtype=torch.int32, device="cuda")
    emap[::2] = torch.arange(E // 2, dtype=torch.int32, device="cuda")
    moe.align_block_size(ids, E, 16, expert_map=emap)
    moe.act_and_mul(torch.randn(T, 2 * 88, device="cuda").bfloat16(), "swigluoai", limit=7.0)
    moe.moe_sum(torch.randn(T, k, 136, device="cuda").bfloat16())
    moe.quantize_activation((torch.randn(T, 136, device="cuda") * 0.1).bfloat16(), "fp8_group", group_size=64)
    for name, scheme in QUANT_SCHEMES.items():
        H, I = DIMS.get(name, (136, 88))
        x = (torch.randn(T, H, device="cuda") * 0.1).bfloat16()
        w13, w2, b13, b2 = random_moe_weights(E, H, I, device="cuda", bias=True)
        q13, q2, s13, s2, block = quantize_experts(w13, w2, scheme)
        kw = experts_kwargs(scheme, s13, s2, block)
        moe.fused_moe(x, logits, q13, q2, k, w13_bias=b13, w2_bias=b2, **kw)
        local = dict(kw)
        if scheme.quantized:
            local.update(w13_scale=s13[: E // 2], w2_scale=s2[: E // 2])
        moe.fused_experts(x, q13[: E // 2], q2[: E // 2], w, ids, expert_map=emap, **local)
torch.cuda.synchronize()
print("sanitize smoke done")
