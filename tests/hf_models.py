"""Tiny random-init transformers MoE models (hidden 64, 4-8 experts, 2-3 layers) and test helpers."""
from __future__ import annotations

import copy

import torch
from torch.profiler import ProfilerActivity, profile

H = 64
_COMMON = dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, initializer_range=0.08)
_DEEPSEEK = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                 rope_scaling=None)

#: model_type -> config overrides. E not a power of two (6) for Qwen and Ernie, I = 48 (no int4 G=32) for some.
CONFIGS = {
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=16),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, num_hidden_layers=3, **_DEEPSEEK),
    "glm4_moe": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                     head_dim=16, num_hidden_layers=3),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                    swiglu_limit=0.5, swiglu_alpha=1.5),  # a limit the data reaches, a non-default alpha
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
                        head_dim=16, interleave_moe_layer_step=1),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=32),
    "phimoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "ernie4_5_moe": dict(intermediate_size=96, moe_intermediate_size=32, moe_num_experts=6, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=0, head_dim=16),
}
MODELS = list(CONFIGS)


def config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **CONFIGS[model_type], **overrides})


def make(model_type: str, dtype=torch.float32, **overrides):
    """A random-init model in eval mode; routing and expert biases (zero at init) made random so they count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config(model_type, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            routing = "e_score_correction_bias" in name or name.endswith("router.bias")
            if routing or ("experts" in name and "bias" in name):
                t.copy_((torch.randn(t.shape) * 0.1).to(t.dtype))
    return model


def hf_blocks(model) -> list:
    from torch_moe_ops.integrations.transformers import PLANNERS

    return [m for m in model.modules() if type(m).__name__ in PLANNERS]


def our_blocks(model) -> list:
    from torch_moe_ops.integrations.transformers import MoEBlock

    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def first(out):
    """A block's hidden states (GPT-OSS and Llama-4 blocks return a pair)."""
    return out[0] if isinstance(out, tuple) else out


def patched_copy(model, quant_config=None):
    from torch_moe_ops.integrations.transformers import patch

    ours = copy.deepcopy(model)
    report = patch(ours, quant_config)
    return ours, report


def peak_bytes(fn):
    """(fn(), peak bytes allocated while it ran, bytes still allocated at its end), CPU allocator events.

    Frees of memory allocated before ``fn`` started are not seen, so the peak is an upper bound unless ``fn``
    allocates what it frees."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak, cur


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def clear_routing(block, x: torch.Tensor) -> torch.Tensor:
    """[T] bool: tokens whose top-k choice has no exact tie in the router logits (bf16 logits tie often;
    transformers' ``torch.topk`` and our op may break a tie differently, which swaps an expert)."""
    logits = block.router_linear()(x.reshape(-1, x.shape[-1])).float()
    k = min(block.experts.top_k + 1, logits.shape[-1])
    top = logits.topk(k, dim=-1).values
    return ~(top[:, :-1] == top[:, 1:]).any(-1)


def masked_sqnr(ref: torch.Tensor, test: torch.Tensor, rows: torch.Tensor) -> float:
    from torch_moe_ops.testing import sqnr_db

    H = ref.shape[-1]
    return sqnr_db(ref.reshape(-1, H)[rows].float(), test.reshape(-1, H)[rows].float())
