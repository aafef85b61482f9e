"""The checkpoint side of loading (docs/design.md §11): checkpoint names (``names.py``), layouts by model type
(``formats.py``), sources and file selection (``sources.py``), name resolution (``resolve.py``) and progress bars.
The per-layer machinery (``WeightLoader``, the streaming state) lives with the layer in
``torch_moe_ops.layer.loading``; the model-level functions in ``torch_moe_ops.checkpoints``."""
