"""Token counts under ``torch.compile(dynamic=True)``: Dynamo's duck sizing and the remedies of docs/compile.md.

A direct call ``compiled(x [T, H], router_logits [T, E])`` whose first T equals H or E gets one symbol for T and
that feature dim; the op's shape checks then pin it, and the next T recompiles. Marking T unbacked on both
inputs keeps one graph (T = 1 included). In a whole model H and E come from parameters (static), so nothing is
duck-sized onto T. Backend: CompileCounter (Dynamo only, no AOT or Inductor), so these stay fast.
"""
import pytest
import torch
import torch._dynamo.testing
import torch.fx.experimental._config as fx_config
from torch import nn

from torch_moe_ops.layer import FusedMoE

# (E, H, I): the sizes measured in docs/compile.md, and odd ones (E prime, H not a power of two)
DIMS = [(8, 64, 32), (7, 40, 24)]
K = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(E, H, I):
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32)
    layer.load_weights(torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1)
    return layer


def _compile(module):
    counter = torch._dynamo.testing.CompileCounter()
    return torch.compile(module, backend=counter, fullgraph=True, dynamic=True), counter


def _call_direct(layer, compiled, T, mark=None):
    x, logits = torch.randn(T, layer.hidden_size), torch.randn(T, layer.num_experts)
    if mark is not None:
        mark(x, logits)
    with torch.no_grad():
        out = compiled(x, logits)
        torch.testing.assert_close(out, layer(x, logits), rtol=1e-5, atol=1e-6)


def _unbacked(x, logits):
    torch._dynamo.decorators.mark_unbacked(x, 0)
    torch._dynamo.decorators.mark_unbacked(logits, 0)


@pytest.mark.parametrize("E, H, I", DIMS)
def test_direct_layer_mark_unbacked_compiles_once(E, H, I):
    """T == H first, then T == E, then T == I, odd T and T = 1: one graph."""
    layer = _layer(E, H, I)
    compiled, counter = _compile(layer)
    for T in (H, E, 37, I, 5, 100, H, 1):
        _call_direct(layer, compiled, T, _unbacked)
    assert counter.frame_count == 1


@pytest.mark.parametrize("E, H, I", DIMS)
@pytest.mark.parametrize("first", ["H", "E"])
def test_direct_layer_without_remedy_recompiles(E, H, I, first):
    """Pins today's torch behaviour (2.13): a first T equal to H or E is specialised, so the next T compiles a
    second graph that then serves every T >= 2. When this fails with frame_count == 1, torch stopped duck-sizing
    T onto the feature dims: update docs/compile.md ("Duck sizing") and the README."""
    layer = _layer(E, H, I)
    compiled, counter = _compile(layer)
    for T in ({"H": H, "E": E}[first], 37, 5, 100):
        _call_direct(layer, compiled, T)
    assert counter.frame_count == 2


@pytest.mark.parametrize("E, H, I", DIMS)
def test_direct_layer_first_T_equal_I_compiles_once(E, H, I):
    """T == I is harmless: no input has a dim of size I (only the static weights do)."""
    layer = _layer(E, H, I)
    compiled, counter = _compile(layer)
    for T in (I, 37, 5, H, E):
        _call_direct(layer, compiled, T)
    assert counter.frame_count == 1


def test_direct_layer_3d_inputs_square_first():
    """x [B, S, H], router_logits [B, S, E] with B == S first: B and S are duck-sized into one symbol (a second
    graph at the next shape); both dims of both inputs marked unbacked: one graph, B = 1 included."""
    E, H, I = DIMS[1]
    layer = _layer(E, H, I)
    shapes = [(4, 4), (2, 7), (3, 5), (1, 6)]

    def call(compiled, mark):
        for B, S in shapes:
            x, logits = torch.randn(B, S, H), torch.randn(B, S, E)
            if mark:
                for t in (x, logits):
                    torch._dynamo.decorators.mark_unbacked(t, 0)
                    torch._dynamo.decorators.mark_unbacked(t, 1)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=1e-5, atol=1e-6)

    compiled, counter = _compile(layer)
    call(compiled, mark=False)
    assert counter.frame_count == 3  # (2, 7) after the B == S graph, then B = 1
    torch._dynamo.reset()
    compiled, counter = _compile(layer)
    call(compiled, mark=True)
    assert counter.frame_count == 1


def _static_feature_dims(x, logits):
    # a positive index: mark_static(x, -1) records -1, which never matches dim 1, and changes nothing
    torch._dynamo.mark_static(x, 1)
    torch._dynamo.mark_static(logits, 1)


@pytest.mark.parametrize("remedy", ["mark_static", "no_duck_shape"])
def test_direct_layer_other_remedies_cover_T_at_least_2(remedy):
    """The partial remedies: one graph for T >= 2 with T == H and T == E; T = 1 still gets its own."""
    E, H, I = DIMS[1]
    layer = _layer(E, H, I)
    compiled, counter = _compile(layer)
    mark = _static_feature_dims if remedy == "mark_static" else None
    with fx_config.patch(use_duck_shape=remedy != "no_duck_shape"):
        for T in (H, E, 37, 5):
            _call_direct(layer, compiled, T, mark)
        assert counter.frame_count == 1
        _call_direct(layer, compiled, 1, mark)
        assert counter.frame_count == 2  # 0/1 specialisation


def test_mark_static_negative_index_is_ignored():
    """Pins why docs/compile.md says to pass dim 1, not -1: with -1 the T == H start still recompiles."""
    E, H, I = DIMS[1]
    layer = _layer(E, H, I)
    compiled, counter = _compile(layer)

    def mark(x, logits):
        torch._dynamo.mark_static(x, -1)
        torch._dynamo.mark_static(logits, -1)

    for T in (H, 37):
        _call_direct(layer, compiled, T, mark)
    assert counter.frame_count == 2


class _Model(nn.Module):
    """embedding -> gate -> FusedMoE: H and E reach the layer from parameters, hence static."""

    def __init__(self, E, H, I, vocab=101):
        super().__init__()
        self.embed = nn.Embedding(vocab, H)
        self.gate = nn.Linear(H, E, bias=False)
        self.moe = _layer(E, H, I)
        self.requires_grad_(False)

    def forward(self, input_ids):  # [B, S] int64 -> [B, S, H] fp32
        h = self.embed(input_ids)
        return self.moe(h, self.gate(h))


def _run_model(model, compiled, shapes, mark=None):
    for shape in shapes:
        ids = torch.randint(0, 101, shape)
        if mark is not None:
            mark(ids)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E, H, I", DIMS)
def test_whole_model_compiles_once_with_T_equal_H_first(E, H, I):
    model = _Model(E, H, I)
    compiled, counter = _compile(model)
    _run_model(model, compiled, [(1, T) for T in (H, E, 37, 5, 100)])
    assert counter.frame_count == 1


def test_whole_model_square_batch_first():
    """input_ids [B, S] with B == S first: duck sizing ties B and S (a recompile at the next shape); marking both
    unbacked keeps one graph, B = 1 and S = 1 included (marking S alone leaves the B = 1 specialisation)."""
    E, H, I = DIMS[1]
    model = _Model(E, H, I)
    shapes = [(4, 4), (2, 7), (3, 3), (1, 5), (6, 1)]
    compiled, counter = _compile(model)
    _run_model(model, compiled, shapes[:2])
    assert counter.frame_count == 2

    def mark(ids):
        torch._dynamo.decorators.mark_unbacked(ids, 0)
        torch._dynamo.decorators.mark_unbacked(ids, 1)

    torch._dynamo.reset()
    compiled, counter = _compile(model)
    _run_model(model, compiled, shapes, mark)
    assert counter.frame_count == 1


def test_transformers_model_square_batch_first_without_duck_shape():
    """A patched transformers model (Mixtral) with input_ids [4, 4] first: mark_unbacked fails inside
    transformers' mask code, so the remedy there is use_duck_shape=False (one graph for B, S >= 2)."""
    transformers = pytest.importorskip("transformers")
    from torch_moe_ops.integrations.transformers import patch

    cfg = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=96, hidden_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24, num_local_experts=5,
        num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    report = patch(model)
    assert report.replaced
    compiled, counter = _compile(model)
    with fx_config.patch(use_duck_shape=False), torch.no_grad():
        for shape in [(4, 4), (2, 7), (3, 5)]:
            ids = torch.randint(0, 96, shape)
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
