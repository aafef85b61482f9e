"""The integration's ``quant_config`` (issue 21): it takes a scheme name in ``patch`` and ``from_pretrained``, equal
to the config object (and a bad one is refused before anything is touched), and a dtype cast after patching keeps
the experts' quantized storage."""
import copy
import os

import pytest
import torch

from torch_moe_ops import Fp8Config, Int8Config

from tests.hf_models import hf_blocks, make, our_blocks

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAMES = r"'none', 'fp8_tensor', 'fp8_channel', 'fp8_block', 'int8_w8a16', 'int4_w4a16', 'mxfp4'"


def _storage(block):
    return dict(block.experts.state_dict())


def _tensors(model):
    """Every parameter and buffer: name -> (type of its module, dtype, data_ptr)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            out[f"{mod_name}.{n}"] = (type(mod).__name__, t.dtype, t.data_ptr())
    return out


# ----------------------------------------------------------------------------- patch


def test_patch_with_a_scheme_name_equals_the_config():
    from torch_moe_ops.integrations.transformers import patch

    model = make("qwen3_moe")
    ref = copy.deepcopy(model)
    report = patch(model, "fp8_block")
    patch(ref, Fp8Config("block"))
    assert len(report.replaced) == 2 and not report.skipped and report.quant_scheme == "fp8_block"
    blocks, ref_blocks = our_blocks(model), our_blocks(ref)
    assert len(blocks) == len(ref_blocks) == 2
    for a, b in zip(blocks, ref_blocks):
        assert a.experts.quant_config == Fp8Config("block") and a.experts.quant_scheme == "fp8_block"
        sa, sb = _storage(a), _storage(b)
        assert sorted(sa) == sorted(sb) and sa["w13_weight"].dtype == torch.float8_e4m3fn
        for n in sa:
            assert torch.equal(sa[n].view(torch.uint8), sb[n].view(torch.uint8)), n
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("quant_config, exc, msg", [
    ("fp8", ValueError, r"quant_config='fp8' is not a scheme name \(fp8 needs a granularity: 'fp8_tensor', "
                        r"'fp8_channel' or 'fp8_block'\); use a config .* or one of " + NAMES + "$"),
    ("fp8_blocks", ValueError, r"quant_config='fp8_blocks' is not a scheme name; .*one of " + NAMES),
    (3, TypeError, r"quant_config must be None, a scheme name \(" + NAMES + r"\) or .*got int$"),
], ids=["fp8", "typo", "int"])
def test_patch_bad_quant_config_changes_nothing(quant_config, exc, msg):
    from torch_moe_ops.integrations.transformers import patch

    model = make("qwen3_moe")
    before = _tensors(model)
    n_blocks = len(hf_blocks(model))
    with pytest.raises(exc, match=msg):
        patch(model, quant_config)
    assert _tensors(model) == before  # same modules, dtypes and data_ptrs: no block was changed
    assert len(hf_blocks(model)) == n_blocks == 2 and not our_blocks(model)


@pytest.mark.parametrize("cast", ["bf16", "half"])
def test_dtype_cast_after_patching_keeps_quantized_storage(cast):
    """docs/transformers.md: ``model.to(torch.bfloat16)`` / ``.half()`` after quantizing keeps the experts' fp8
    storage and fp32 scales (same data_ptrs); the rest of the model follows the cast and the model still runs."""
    from torch_moe_ops.integrations.transformers import patch
    from torch_moe_ops.testing import sqnr_db

    model = make("qwen3_moe")
    patch(model, "fp8_channel")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    before = {(i, n): (t.dtype, t.data_ptr()) for i, b in enumerate(our_blocks(model))
              for n, t in b.experts.state_dict().items()}
    dtype = {"bf16": torch.bfloat16, "half": torch.float16}[cast]
    model.to(dtype) if cast == "bf16" else model.half()
    after = {(i, n): (t.dtype, t.data_ptr()) for i, b in enumerate(our_blocks(model))
             for n, t in b.experts.state_dict().items()}
    assert after == before and {d for d, _ in after.values()} == {torch.float8_e4m3fn, torch.float32}
    assert all(b.router_linear().weight.dtype == dtype for b in our_blocks(model))
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == dtype and sqnr_db(want.float(), got.float()) > 20.0


# ----------------------------------------------------------------------------- from_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(11)
    model = make("qwen3_moe")
    path = tmp_path_factory.mktemp("qwen3_moe")
    model.save_pretrained(path)
    return model, str(path)


def test_from_pretrained_with_a_scheme_name_equals_the_config(saved):
    from torch_moe_ops.integrations.transformers import from_pretrained

    _, path = saved
    ours = from_pretrained(path, "int8_w8a16", progress=False)
    ref = from_pretrained(path, Int8Config(), progress=False)
    assert ours.torch_moe_ops_report.quant_scheme == ref.torch_moe_ops_report.quant_scheme == "int8_w8a16"
    for a, b in zip(our_blocks(ours), our_blocks(ref), strict=True):
        assert a.experts.quant_config == Int8Config() and a.experts.w13_weight.dtype == torch.int8
        sa, sb = _storage(a), _storage(b)
        assert sorted(sa) == sorted(sb)
        for n in sa:
            assert torch.equal(sa[n], sb[n]), n
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_from_pretrained_bad_scheme_name_reads_nothing(saved, monkeypatch):
    import importlib

    from transformers import AutoConfig

    from torch_moe_ops.integrations.transformers import from_pretrained

    fp_mod = importlib.import_module("torch_moe_ops.integrations.transformers.from_pretrained")
    touched = []

    def record(what):
        def f(*a, **k):
            touched.append(what)
            raise AssertionError(f"{what} ran before quant_config was checked")
        return f

    monkeypatch.setattr(fp_mod, "checkpoint_files", record("checkpoint_files"))
    monkeypatch.setattr(fp_mod, "Checkpoint", record("Checkpoint"))
    monkeypatch.setattr(AutoConfig, "from_pretrained", record("AutoConfig.from_pretrained"))
    _, path = saved
    with pytest.raises(ValueError, match=r"quant_config='fp8' is not a scheme name .*one of " + NAMES):
        from_pretrained(path, "fp8", progress=False)
    with pytest.raises(TypeError, match=r"quant_config must be None, a scheme name"):
        from_pretrained(path, 8, progress=False)
    assert touched == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"quant_config='fp8' is not a scheme name"):  # not "is not a folder"
        from_pretrained(os.path.join(path, "nowhere"), "fp8", progress=False)
