"""``torch_moe_ops.training`` with ``FusedMoE``: trainable parameters, the saving forward (c1 kept) against
the recomputing one, frozen quantized layers, and a few optimizer steps that lower the loss."""
import pytest
import torch

from torch_moe_ops import FusedMoE, Fp8Config, training

from tests.grad_oracle import assert_grad_close

E, K, H, I = 4, 2, 32, 32


def _layer(quant_config=None, activation="silu", bias=True):
    layer = FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=quant_config, activation=activation,
                     has_bias=bias)
    n1 = 2 * I if not activation.endswith("_no_mul") else I
    b13, b2 = (torch.randn(E, n1) / 5, torch.randn(E, H) / 5) if bias else (None, None)
    layer.load_weights(torch.randn(E, n1, H) / 5, torch.randn(E, H, I) / 5, w13_bias=b13, w2_bias=b2)
    return layer


def _forward(layer, x, logits, saving):
    if not saving:
        return layer(x, logits)
    w, ids = layer.select_experts(logits)
    return training.run_experts_saving(layer, x, w, ids)


def test_set_trainable_unquantized():
    layer = _layer()
    assert not any(p.requires_grad for p in layer.parameters())
    assert training.set_trainable(layer) == ["w13_weight", "w2_weight", "w13_bias", "w2_bias"]
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(training.TRAINABLE)
    training.set_trainable(layer, False)
    assert not any(p.requires_grad for p in layer.parameters())


def test_set_trainable_quantized_keeps_weights_frozen():
    layer = _layer(Fp8Config("channel"))
    assert training.set_trainable(layer) == ["w13_bias", "w2_bias"]
    assert not layer.w13_weight.requires_grad and not layer.w13_weight_scale.requires_grad


@pytest.mark.parametrize("quant", [None, "fp8_channel"])
def test_saving_forward_equals_recompute(quant):
    layer = _layer(Fp8Config("channel") if quant else None, activation="gelu")
    training.set_trainable(layer)
    x = torch.randn(9, H, requires_grad=True)
    logits = torch.randn(9, E, requires_grad=True)
    leaves = [x, logits] + [p for p in layer.parameters() if p.requires_grad]
    g = torch.randn(9, H)
    grads = []
    for saving in (False, True):
        out = _forward(layer, x, logits, saving)
        grads.append((out, *torch.autograd.grad(out, leaves, g)))
    for a, b in zip(*grads):
        assert_grad_close(a, b, 1e-6)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    layer = _layer()
    router = torch.nn.Linear(H, E)
    params = training.set_trainable(layer)
    opt = torch.optim.Adam([getattr(layer, n) for n in params] + list(router.parameters()), lr=1e-2)
    x, target = torch.randn(64, H), torch.randn(64, H) / 10
    losses = []
    for step in range(8):
        out = _forward(layer, x, router(x), saving=step % 2 == 1)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_check_trainable():
    with pytest.raises(ValueError, match="save_activations=True only applies"):
        training.check_trainable(False, True, None)
    training.check_trainable(True, True, None)


_HAS_FLAG = "trainable" in __import__("inspect").signature(FusedMoE.__init__).parameters


@pytest.mark.skipif(not _HAS_FLAG, reason="FusedMoE(trainable=...) not wired yet (layer patch pending)")
@pytest.mark.parametrize("quant", [None, "fp8_channel"])
def test_layer_trainable_flag(quant):
    """``FusedMoE(trainable=True[, save_activations=True])``: the right parameters train, both modes agree."""
    qc = Fp8Config("channel") if quant else None
    layers = [FusedMoE(E, K, H, I, params_dtype=torch.float32, quant_config=qc, has_bias=True, trainable=True,
                       save_activations=save) for save in (False, True)]
    for layer in layers:
        layer.load_weights(torch.randn(E, 2 * I, H) / 5, torch.randn(E, H, I) / 5, w13_bias=torch.randn(E, 2 * I) / 5,
                           w2_bias=torch.randn(E, H) / 5)
    layers[1].load_state_dict(layers[0].state_dict())
    want = {"w13_bias", "w2_bias"} | (set() if quant else {"w13_weight", "w2_weight"})
    x, logits, g = torch.randn(9, H, requires_grad=True), torch.randn(9, E), torch.randn(9, H)
    grads = []
    for layer in layers:
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == want
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(layer(x, logits), leaves, g))
    for a, b in zip(*grads):
        assert_grad_close(a, b, 1e-6)
    with pytest.raises(ValueError, match="save_activations=True only applies"):
        FusedMoE(E, K, H, I, save_activations=True)
