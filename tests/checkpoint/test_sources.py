"""What ``load_checkpoint`` makes of a folder or dict source before it writes anything (docs/design.md §11): a
broken index or a consolidated-only folder raises naming the files, and a model type (the argument or the folder's
config.json) that contradicts the checkpoint's fused layout is named."""
import json

import pytest
import torch
from safetensors.torch import save_file

from torch_moe_ops import LoadError
from torch_moe_ops.checkpoint import finalize_loading, load_checkpoint

from tests.moe_models import MoEModel, hf_checkpoint

E, K = 5, 2


def _folder(tmp_path, sd, files=2):
    names = sorted(sd)
    shards = {f"model-{i + 1:05d}-of-{files:05d}.safetensors": names[i::files] for i in range(files)}
    for f, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp_path / f))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    return shards, weight_map


def _write_index(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_broken_folders_raise_before_anything_is_written(tmp_path):
    Hs, Is = 64, 48
    sd = hf_checkpoint(1, E, Hs, Is, style="mixtral")
    shards, weight_map = _folder(tmp_path, sd)
    model = MoEModel(1, E, K, Hs, Is, params_dtype=torch.float32)
    name = next(iter(weight_map))
    _write_index(tmp_path, {**weight_map, "model.extra": "model-00009-of-00009.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"names shards that are not in .*\['model-00009-of-00009"):
        load_checkpoint(model, str(tmp_path), progress=False)
    wrong = next(f for f in shards if f != weight_map[name])
    _write_index(tmp_path, {**weight_map, name: wrong})
    with pytest.raises(LoadError, match=rf"checkpoint tensor '{name}' is listed in {wrong}, but it is in"):
        load_checkpoint(model, str(tmp_path), progress=False)
    assert model.layers[0].experts.load_state == "fresh"
    for f in shards:
        (tmp_path / f).rename(tmp_path / ("consolidated" + f.removeprefix("model")))
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="has only consolidated.*convert it"):
        load_checkpoint(model, str(tmp_path), progress=False)


@pytest.mark.parametrize("where", ["argument", "config.json"])
def test_a_model_type_contradicting_the_fused_layout_is_named(tmp_path, where):
    """A Mixtral-v5 fused checkpoint ([E, 2I, H], [E, H, I], non-square) said to be GPT-OSS (transposed)."""
    Hs, Is = 64, 48
    sd = hf_checkpoint(1, E, Hs, Is, style="fused")
    model = MoEModel(1, E, K, Hs, Is, params_dtype=torch.float32)
    if where == "argument":
        call = lambda: load_checkpoint(model, sd, model_type="gpt_oss", progress=False)  # noqa: E731
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
        call = lambda: load_checkpoint(model, str(tmp_path), progress=False)  # noqa: E731
    with pytest.raises(ValueError, match=r"experts.(gate_up|down)_proj'.*shape \[5, (96|64), (64|48)\] is the "
                                         r"\[E, out, in\] layout, but model type 'gpt_oss' stores fused experts \[E, in, out\].*nothing was "
                                         "written"):
        call()
    assert model.layers[0].experts.load_state == "fresh"
    load_checkpoint(model, sd, model_type="mixtral", progress=False)
    finalize_loading(model)
