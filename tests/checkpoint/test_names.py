"""Hugging Face names of expert tensors (``checkpoint/names.py``, docs/design.md §11), parsed without a model:
weights, scales (``weight_scale_inv``, ``weight_scale``) and input scales."""
from torch_moe_ops.checkpoint.names import parse_expert_name


def test_checkpoint_names_of_scales():
    p = parse_expert_name("model.layers.3.mlp.experts.7.down_proj.weight_scale_inv")
    assert (p.prefix, p.expert, p.kind, p.target(p.shard(True))) == ("model.layers.3.mlp", 7, "scale",
                                                                     "w2_weight_scale")
    p = parse_expert_name("m.block_sparse_moe.experts.0.w3.weight_scale")
    assert (p.kind, p.shard(True), p.target("w3")) == ("scale", "w3", "w13_weight_scale")
    assert parse_expert_name("m.mlp.experts.2.gate_proj.input_scale").kind == "input_scale"
    assert not parse_expert_name("m.mlp.experts.2.gate_proj.weight").bias
