"""``patch`` against transformers' own implementation of the same random-init block and model, every model the
installed transformers provides: fp32 equal to tight tolerance (blocks, logits, router logits, greedy
generate), bf16 no worse than transformers' own bf16, quantized schemes above the docs/design.md §13 floors."""
import copy

import pytest
import torch

from torch_moe_ops import Fp8Config, Int4Config, Int8Config

from tests.hf_models import H, MODELS, clear_routing, first, hf_blocks, make, masked_sqnr, our_blocks, patched_copy

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = [(1, 1), (2, 7), (3, 11)]  # T = 1 (most experts empty), odd T
#: quantized schemes and their SQNR floors (docs/design.md §13: fp8 / int8 > 20 dB, int4 > 13 dB)
QUANT = {"fp8_tensor": (Fp8Config("tensor"), 20.0), "fp8_channel": (Fp8Config("channel"), 20.0),
         "fp8_block": (Fp8Config("block", block_shape=(32, 32)), 20.0), "int8_w8a16": (Int8Config(), 20.0),
         "int4_w4a16": (Int4Config(group_size=32), 13.0)}


#: every scheme on the layouts with most to get wrong (GPT-OSS: transposed, interleaved, biases; DeepSeek-V3:
#: grouped sigmoid routing, shared experts), one scheme per other model (the quantizing path is shared)
_ONE = {"mixtral": "fp8_block", "qwen2_moe": "fp8_channel", "qwen3_moe": "int4_w4a16", "glm4_moe": "int8_w8a16",
        "llama4_text": "fp8_tensor", "olmoe": "int8_w8a16", "granitemoe": "int4_w4a16",
        "granitemoeshared": "fp8_tensor",
        "phimoe": "fp8_channel", "ernie4_5_moe": "fp8_block"}
QUANT_CASES = [(m, s) for m in ("gpt_oss", "deepseek_v3") for s in QUANT] + list(_ONE.items())


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(model_type):
        if model_type not in cache:
            torch.manual_seed(len(cache) + 1)
            ref = make(model_type)
            cache[model_type] = (ref, patched_copy(ref))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", MODELS)
def test_blocks_fp32(models, model_type):
    ref, (ours, report) = models(model_type)
    theirs, mine = hf_blocks(ref), our_blocks(ours)
    assert len(mine) == len(theirs) >= 1 and not hf_blocks(ours)
    assert len(report.replaced) == len(theirs) and not report.skipped
    for hf_block, block in zip(theirs, mine):
        for B, S in SHAPES:
            x = torch.randn(B, S, H)
            with torch.no_grad():
                want, got = hf_block(x), block(x)
            assert type(got) is type(want) and first(got).shape == first(want).shape
            torch.testing.assert_close(first(got), first(want), rtol=1e-5, atol=1e-5)
            if model_type.startswith("llama4"):  # (out [T, H], router_logits [T, E]) like Llama4TextMoe
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODELS)
def test_model_logits_and_router_logits_fp32(models, model_type):
    ref, (ours, _) = models(model_type)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = ref(ids, output_router_logits=True)
        got = ours(ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    if want.router_logits:  # recorded through the same hook on our router
        assert len(got.router_logits) == len(want.router_logits)
        for g, w in zip(got.router_logits, want.router_logits):
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-5)
    if getattr(want, "aux_loss", None) is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", MODELS)
def test_greedy_generate_identical_fp32(models, model_type):
    ref, (ours, _) = models(model_type)
    ids = torch.randint(1, 96, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", MODELS)
def test_bf16_against_transformers_bf16(models, model_type):
    """Against transformers' bf16 block (same router arithmetic, so the same experts, except on exact ties of
    bf16 logits, which each side may break its own way: those tokens are left out): only intermediate
    roundings differ (bf16 keeps 8 mantissa bits, ~50 dB per rounding). Against fp32 both lose the same."""
    ref, _ = models(model_type)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours16, _ = patched_copy(ref16)
    x = torch.randn(3, 11, H)
    for b32, b16, mine in zip(hf_blocks(ref), hf_blocks(ref16), our_blocks(ours16)):
        assert mine.experts.w13_weight.dtype == torch.bfloat16
        with torch.no_grad():
            exact, theirs, got = first(b32(x)), first(b16(x.bfloat16())), first(mine(x.bfloat16()))
            rows = clear_routing(mine, x.bfloat16())
        assert rows.float().mean() > 0.7
        assert masked_sqnr(theirs, got, rows) > 35
        assert masked_sqnr(exact, got, rows) > masked_sqnr(exact, theirs, rows) - 1


@pytest.mark.parametrize("model_type, scheme", QUANT_CASES)
def test_quantized_sqnr(models, model_type, scheme):
    qc, floor = QUANT[scheme]
    ref, _ = models(model_type)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours, report = patched_copy(ref16, qc)
    assert report.quant_scheme == scheme and len(report.replaced) == len(hf_blocks(ref))
    assert report.expert_bytes_after < report.expert_bytes_before * 0.6  # 8 or 4 bits instead of 16
    x = torch.randn(3, 11, H).bfloat16()
    # the bf16 transformers block routes like ours (same router arithmetic; exact ties left out, see above):
    # the gap is the quantization's
    for b16, mine in zip(hf_blocks(ref16), our_blocks(ours)):
        assert mine.experts.quant_scheme == scheme
        with torch.no_grad():
            rows = clear_routing(mine, x)
            assert masked_sqnr(first(b16(x)), first(mine(x)), rows) > floor
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.isfinite(ours(ids).logits).all()
