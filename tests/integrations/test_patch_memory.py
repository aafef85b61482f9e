"""``patch`` memory: no copy without a quant config, full-precision experts freed as each block is quantized."""
import copy

import pytest
import torch

from torch_moe_ops import Fp8Config

from tests.hf_models import make, nbytes, our_blocks, peak_bytes

pytest.importorskip("transformers")

from torch_moe_ops.integrations import transformers as tmo  # noqa: E402

E, H, I = 8, 128, 256
EXPERT = 3 * H * I * 4  # one fp32 expert (gate, up, down)


def _model(model_type):
    if model_type == "gpt_oss":
        return make("gpt_oss", hidden_size=H, intermediate_size=I, num_local_experts=E)
    return make("mixtral", hidden_size=H, intermediate_size=I, num_local_experts=E)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_no_quant_config_moves_without_copying(model_type):
    """The experts' storage becomes the layer's; GPT-OSS's transposed experts are transposed in place
    through a one-expert scratch."""
    model = _model(model_type)
    before = [b.experts.gate_up_proj.data_ptr() for b in model.modules() if type(b).__name__ in tmo.PLANNERS]
    _, peak, net = peak_bytes(lambda: tmo.patch(model))
    assert peak <= EXPERT and net <= 64 * 1024
    assert [b.experts.w13_weight.data_ptr() for b in our_blocks(model)] == before


def test_quantizing_frees_each_block_as_it_goes():
    """Measured from a model allocated inside the measurement, so every free counts. On CPU the host is the
    device: block 0's quantized layer (E/4 fp32 experts in fp8) comes on top of the model, then each block's
    full-precision experts are freed before the next layer is allocated."""
    model = _model("mixtral")
    old = model.model.layers[0].mlp  # a reference the caller still holds does not keep the storage alive
    model_bytes = nbytes(model.parameters())

    def run():
        m = copy.deepcopy(model)
        report = tmo.patch(m, Fp8Config("tensor"))
        return m, report

    (patched, report), peak, net = peak_bytes(run)
    q_layer = nbytes(our_blocks(patched)[0].experts.parameters())
    assert peak - model_bytes <= q_layer + 2 * EXPERT
    assert net - model_bytes <= report.expert_bytes_after - report.expert_bytes_before + 64 * 1024
    tmo.patch(model, Fp8Config("tensor"))
    assert old.experts.gate_up_proj.numel() == 0 and old.experts.down_proj.numel() == 0


@pytest.mark.cuda
def test_cuda_peak_within_model_plus_two_experts():
    """A quantized layer (96 MiB in fp8) larger than the 64 MiB slack: the first block goes through host memory."""
    model = make("qwen3_moe", hidden_size=1024, moe_intermediate_size=2048, num_experts=16).to("cuda", torch.bfloat16)
    expert = 3 * 1024 * 2048 * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    report = tmo.patch(model, Fp8Config("tensor"))
    assert report.offloaded[:1] == ["model.layers.0.mlp"]  # nothing saved yet when block 0 is quantized
    assert torch.cuda.max_memory_allocated() - start <= 2 * expert + (64 << 20)
    # 1 MiB of slack: the new layer's small buffers (scales' padding, router, allocator rounding) are not expert bytes
    assert torch.cuda.memory_allocated() - start <= report.expert_bytes_after - report.expert_bytes_before + (1 << 20)
