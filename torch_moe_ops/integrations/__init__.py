"""Integrations of torch_moe_ops with model libraries (top floor: they consume the public API only).

- ``torch_moe_ops.integrations.transformers``: Hugging Face transformers MoE models (``patch``,
  ``from_pretrained``, the ``"torch_moe_ops"`` experts implementation); needs ``pip install torch-moe-ops[hf]``.

``import torch_moe_ops`` imports only ``hf_registration`` (no library): it makes
``experts_implementation="torch_moe_ops"`` known to transformers whether transformers is imported before or after.
Each integration imports its library when it is itself imported.
"""
