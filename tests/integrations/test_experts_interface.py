"""``experts_implementation="torch_moe_ops"``: transformers' own routers, our fused experts on the module's tensors;
it works whichever of ``torch_moe_ops`` and transformers is imported first (and, as documented, not at all without
``import torch_moe_ops``)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.hf_models import config, make

pytest.importorskip("transformers")

from torch_moe_ops.integrations import transformers as tmo  # noqa: E402

#: models whose experts class uses @use_experts_implementation with the default gate (PhiMoE: its SparseMixer
#: router is transformers'; Ernie and DeepSeek-V3: with shared experts; Qwen2: with the gated shared expert)
DECORATED = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "granitemoe", "phimoe", "ernie4_5_moe"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


# ----------------------------------------------------------------------------- experts_implementation, fresh processes


_SCRIPT = """
import sys
import torch
ORDER = {order!r}
if ORDER == "before":
    import torch_moe_ops
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
if ORDER == "after":
    import torch_moe_ops
assert ("torch_moe_ops" in sys.modules) == (ORDER != "never")
from torch.utils._python_dispatch import TorchDispatchMode

class Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.name()))
        return func(*args, **(kwargs or {{}}))

cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                     num_experts_per_tok=2, head_dim=16, max_position_embeddings=64)
torch.manual_seed(0)
try:
    model = Qwen3MoeForCausalLM._from_config(cfg, experts_implementation="torch_moe_ops", dtype=torch.bfloat16)
except ValueError as exc:
    print("REFUSED", exc)
    raise SystemExit(0)
model.eval()
assert model.config._experts_implementation == "torch_moe_ops"
ids = torch.randint(0, 96, (2, 7))
with torch.no_grad(), Seen() as seen:
    got = model(ids).logits
model.set_experts_implementation("eager")
with torch.no_grad(), Seen() as eager:
    want = model(ids).logits
assert "moe::fused_experts" in seen.ops and "moe::fused_experts" not in eager.ops, (seen.ops, eager.ops)
torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
print("OK", got.dtype, float((got.float() - want.float()).abs().max()))
"""


def _run(order: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(order=order)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("order", ["before", "after"])
def test_experts_implementation_in_a_fresh_process(order):
    """``import torch_moe_ops`` before or after transformers: the name is known and runs ``moe::fused_experts``,
    equal to transformers' eager experts to bf16 tolerance."""
    out = _run(order)
    assert re.search(r"^OK torch.bfloat16 ", out, re.M), out


def test_experts_implementation_without_import_is_transformers_error():
    """Documented: without ``import torch_moe_ops`` transformers does not know the name (its own error)."""
    out = _run("never")
    assert re.search(r'^REFUSED Specified `experts_implementation="torch_moe_ops"` is not supported', out, re.M), out
