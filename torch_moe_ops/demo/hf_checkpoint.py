"""The HF demo's checkpoint: a random-weight Qwen3-MoE written by transformers' own ``save_pretrained`` as a
sharded safetensors folder (``config.json``, ``model-0000i-of-0000n.safetensors``, ``model.safetensors.index.json``),
i.e. exactly what ``hf download`` gives for a real model."""
from __future__ import annotations

import os

import torch

SHARDS = 4  #: the checkpoint is split into about this many files, so that the index is exercised


def qwen3_moe_config(*, layers: int, experts: int, top_k: int, hidden: int, intermediate: int, vocab: int):
    """A small ``Qwen3MoeConfig``: every layer sparse, 4 query / 2 key-value heads of ``hidden / 4``.

    Weights are drawn with std ``hidden ** -0.5`` (transformers' default 0.02 would make the experts' share
    of the residual stream tiny at these sizes, and the logits' SQNR would flatter the quantized experts)."""
    from transformers import Qwen3MoeConfig

    if hidden % 4:
        raise ValueError(f"--hidden must be a multiple of 4 (4 attention heads), got {hidden}")
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=512, initializer_range=hidden**-0.5, tie_word_embeddings=False)


def write_checkpoint(path: str, config, seed: int) -> dict:
    """Build ``Qwen3MoeForCausalLM(config)`` with seeded random weights in bf16 and ``save_pretrained`` it into
    ``path`` in about ``SHARDS`` files. Returns ``{"files": [names], "bytes": int}`` (bytes of the tensors)."""
    from transformers import Qwen3MoeForCausalLM

    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=max(nbytes // SHARDS, 1 << 16))
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    if "model.safetensors.index.json" not in files:  # the demo promises a sharded checkpoint
        raise RuntimeError(f"save_pretrained wrote no model.safetensors.index.json in {path}: {files}")
    return {"files": files, "bytes": nbytes}
