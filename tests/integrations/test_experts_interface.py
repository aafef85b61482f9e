"""``experts_implementation="torch_moe_ops"``: transformers' own routers, our fused experts on the module's tensors."""
import pytest
import torch

from tests.hf_models import config, make

pytest.importorskip("transformers")

from torch_moe_ops.integrations import transformers as tmo  # noqa: E402

#: models whose experts class uses @use_experts_implementation with the default gate (PhiMoE: its SparseMixer
#: router is transformers'; Ernie and DeepSeek-V3: with shared experts; Qwen2: with the gated shared expert)
DECORATED = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "granitemoe", "phimoe", "ernie4_5_moe"]


def test_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert tmo.EXPERTS_IMPLEMENTATION == "torch_moe_ops" and "torch_moe_ops" in ALL_EXPERTS_FUNCTIONS


@pytest.mark.parametrize("model_type", DECORATED)
def test_matches_eager(model_type):
    model = make(model_type)
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("torch_moe_ops")
        assert model.config._experts_implementation == "torch_moe_ops"
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_from_config_argument():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config("qwen3_moe"), experts_implementation="torch_moe_ops").eval()
    assert model.config._experts_implementation == "torch_moe_ops"
    ref = AutoModelForCausalLM.from_config(config("qwen3_moe"), experts_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_transposed_experts_are_refused_with_the_way_out():
    model = make("gpt_oss")
    model.set_experts_implementation("torch_moe_ops")
    msg = r"cannot run GptOssExperts: its weights are stored transposed.*patch\(model\)"
    with pytest.raises(ValueError, match=msg):
        with torch.no_grad():
            model(torch.randint(0, 96, (1, 4)))
