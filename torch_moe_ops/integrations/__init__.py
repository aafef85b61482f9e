"""Integrations of torch_moe_ops with model libraries (top floor: they consume the public API only).

- ``torch_moe_ops.integrations.transformers``: Hugging Face transformers MoE models (``patch``,
  ``from_pretrained``, the ``"torch_moe_ops"`` experts implementation); needs ``pip install torch-moe-ops[hf]``.

Nothing here is imported by ``import torch_moe_ops``: each integration imports its library when it is imported.
"""
