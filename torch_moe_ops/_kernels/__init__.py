"""Triton kernels and their launchers. Importing a submodule needs Triton; launchers take validated,
canonical arguments (the ops layer checks everything first and resolves names into the registry objects
of ``torch_moe_ops.schemes``) and run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Launchers (one module each; ``_numerics`` holds the shared ``@triton.jit`` rounding / scale helpers,
``formats`` the weight codecs' decoding and the GEMMs' shared prologue, ``activation`` each activation's f
and f' in one ``_elementwise``, ``topk`` the router's top-k that the routing kernel and GEMM1 at T = 1 share):
- ``routing.topk_route(router_logits, top_k, renormalize, scoring_func, num_expert_group, topk_group,
  e_score_correction_bias, routed_scaling_factor) -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)``
- ``align.align_block_size(topk_ids, num_experts, block_size, expert_map) -> (sorted_ids, expert_ids, num_post_pad)``
- ``activation.act_and_mul(x, act, alpha, limit, out=None)``,
  ``activation.act_and_quant(x, act, alpha, limit, aq, group) -> (q, scale)``,
  ``activation.quantize_activation(x, aq, group) -> (q, scale)``
- ``moe_sum.moe_sum(x, out=None, topk_ids=None, expert_map=None, num_experts=0)``
- ``quant.quantize_weight_into(w, qweight, scale, fmt, block, shards)`` (per tensor: ``quant_tensor``)
- ``gemm.invoke_moe_gemm(a, w, c, sorted_ids, expert_ids, num_post_pad, *, top_k, config, scheme, ...)``
- ``fused_experts.fused_experts(x, w13, w2, topk_weights, topk_ids, act, scheme, w13_scale, w2_scale,
  w13_bias, w2_bias, block, expert_map, on_input, alpha, limit, alignment=None, keep_c1=False)``: the whole
  expert pipeline; its steps ``gemm1_input`` / ``gemm1`` / ``gemm2_input`` are the backward's too.
- ``backward.fused_experts_backward(grad_out, x, ..., needs, c1)``: dgrad / wgrad GEMMs (docs/training.md).
- ``linear.linear(x, weight, bias)``: a batch-invariant dense linear (the GEMM as one expert).
- ``plan``: launch plans (docs/host-overhead.md).
- ``configs.get_config(T, E, N, K, scheme, block, device, *, top_k)``: the GEMM's tiles.
"""
