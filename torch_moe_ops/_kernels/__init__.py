"""Triton kernels and their launchers. Importing a submodule needs Triton; launchers take validated,
canonical arguments (the ops layer checks everything first) and run on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1``.

Launchers (one module each):
- ``routing.topk_route(router_logits, top_k, renormalize, scoring_func, num_expert_group, topk_group,
  e_score_correction_bias, routed_scaling_factor) -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)``
- ``align.align_block_size(topk_ids, num_experts, block_size, expert_map) -> (sorted_ids, expert_ids, num_post_pad)``
- ``activation.act_and_mul(x, activation, alpha, limit, out=None)``,
  ``activation.moe_sum(x, out=None, topk_ids=None, expert_map=None, num_experts=0)``
- ``quant.quantize_weight_into(w, qweight, scale, scheme, block_shape, shards)``,
  ``quant.quantize_activation(x, scheme, group_size) -> (q, scale)``
- ``fused_experts.fused_experts(...)``: the whole expert pipeline (align, quantize, GEMM1, act, GEMM2, sum).
"""
