"""Batch-invariant mode through the transformers integration (docs/batch-invariance.md): ``patch`` and
``from_pretrained`` set every layer's flag, a bad flag is refused before the model changes, the
``experts_implementation`` path follows the switch, and a patched model's expert rows are invariant."""
import pytest
import torch

import torch_moe_ops
from torch_moe_ops.testing import batch_variance

from tests.hf_models import hf_blocks, make, our_blocks

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_patch_sets_the_flag_and_refuses_a_bad_one_first():
    from torch_moe_ops.integrations.transformers import patch

    model = make("qwen3_moe")
    with pytest.raises(TypeError, match="batch_invariant must be True, False or None"):
        patch(model, batch_invariant="yes")
    assert hf_blocks(model) and not our_blocks(model)  # nothing replaced
    patch(model, "int8_w8a16", batch_invariant=True)
    assert [b.experts.batch_invariant for b in our_blocks(model)] == [True] * 2
    patch(model, batch_invariant=False)  # already patched: the flag still changes
    assert [b.experts.batch_invariant for b in our_blocks(model)] == [False] * 2
    patch(model)  # None leaves an explicit setting alone
    assert [b.experts.batch_invariant for b in our_blocks(model)] == [False] * 2


def test_from_pretrained_sets_the_flag(tmp_path):
    from torch_moe_ops.integrations.transformers import from_pretrained

    make("mixtral").save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="batch_invariant must be True, False or None"):
        from_pretrained(tmp_path, progress=False, batch_invariant=1)
    model = from_pretrained(tmp_path, "fp8_block", progress=False, batch_invariant=True)
    assert [b.experts.batch_invariant for b in our_blocks(model)] == [True] * 2
    default = from_pretrained(tmp_path, progress=False)
    assert [b.experts.batch_invariant for b in our_blocks(default)] == [None] * 2


def test_experts_implementation_follows_the_switch(invariant_calls):
    seen = invariant_calls
    model = make("qwen3_moe")
    model.set_experts_implementation("torch_moe_ops")
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        model(ids)
        with torch_moe_ops.batch_invariant():
            model(ids)
    assert seen == [False, False, True, True]  # two MoE layers a forward


@pytest.mark.parametrize("quant", [None, "fp8_channel", torch_moe_ops.Int4Config(32)], ids=["none", "fp8", "int4"])
def test_patched_experts_rows_do_not_depend_on_the_batch(quant):
    """The experts of a patched block, given router logits: invariant rows. (The block's router is a transformers
    nn.Linear: a torch matmul, outside what the mode covers.)"""
    from torch_moe_ops.integrations.transformers import patch

    model = make("qwen3_moe").to(torch.bfloat16)
    patch(model, quant, batch_invariant=True)
    layer = our_blocks(model)[0].experts
    x = torch.randn(48, layer.hidden_size, dtype=torch.bfloat16)
    logits = torch.randn(48, layer.num_experts)
    with torch.no_grad():
        got = batch_variance(layer, (x, logits), sizes=(1, 7))
    assert all(bad == 0 for bad, _ in got.values()), got


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "llama4_text"])
def test_patched_block_rows_do_not_depend_on_the_batch(model_type):
    """The whole MoE block in the mode: the router (``moe::linear``; DeepSeek-V3's in fp32) and the shared
    experts (gated MLPs through ``invariant_mlp``; Qwen2-MoE's sigmoid shared-expert gate) as well as the routed
    experts: block(x) rows invariant, and close to the default mode's."""
    from torch_moe_ops.integrations.transformers import patch

    from tests.hf_models import first

    model = make(model_type)
    patch(model, batch_invariant=True)
    block = our_blocks(model)[0]
    x = torch.randn(48, block.experts.hidden_size)
    with torch.no_grad():
        got = batch_variance(lambda x: first(block(x)), (x,), sizes=(1, 7, 19))
        invariant = first(block(x))
        block.experts.batch_invariant = False
        torch.testing.assert_close(invariant, first(block(x)), rtol=1e-5, atol=1e-5)
    assert all(bad == 0 for bad, _ in got.values()), got
