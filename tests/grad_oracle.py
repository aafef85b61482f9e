"""An independent fp64 oracle for the gradients: the MoE written densely with plain torch ops (every pair
gathers its expert's weights) and differentiated by autograd. It shares no code with the package; only the
quantized tests pass in the package's fake quantization (``fq``: the values the GEMMs saw)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FNS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu2": lambda v: F.relu(v) ** 2}


def dense_activation(name: str, c1: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    if name.endswith("_no_mul"):
        return _FNS[name[: -len("_no_mul")]](c1)
    if name == "swigluoai":  # interleaved gate/up
        g, u = c1[..., 0::2], c1[..., 1::2]
    else:
        g, u = c1.chunk(2, dim=-1)
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    if name == "swigluoai":
        return (u + 1) * g * torch.sigmoid(alpha * g)
    return _FNS[name](g) * u


def dense_experts(x, w13, w2, tw, ids, activation="silu", b13=None, b2=None, expert_map=None, on_input=False,
                  alpha=1.702, limit=0.0, fq=None):
    """x [T, H], w13 [E, N1, H], w2 [E, H, I], tw [T, k], ids [T, k] (global when expert_map is given) -> [T, H].

    Pairs of non-local experts (map value -1) contribute 0. ``fq``: applied to both GEMM inputs."""
    T, k = ids.shape
    ids = ids.long()
    local = expert_map.long()[ids] if expert_map is not None else ids
    keep = (local >= 0).to(x.dtype)[..., None]
    e = local.clamp(min=0)
    a = x[:, None, :].expand(T, k, x.shape[1])
    if on_input:
        a = a * tw[..., None]
    if fq is not None:
        a = fq(a)
    c1 = torch.einsum("tkh,tknh->tkn", a, w13[e])
    if b13 is not None:
        c1 = c1 + b13[e]
    h = dense_activation(activation, c1, alpha, limit)
    if fq is not None:
        h = fq(h)
    y = torch.einsum("tki,tkhi->tkh", h, w2[e])
    if b2 is not None:
        y = y + b2[e]
    if not on_input:
        y = y * tw[..., None]
    return (y * keep).sum(1)


def dense_route_weights(logits, ids, renormalize=True, scoring_func="softmax", routed_scaling_factor=1.0):
    """The router weights of the selection ``ids`` [T, k] as a differentiable function of logits [T, E]."""
    s = torch.sigmoid(logits) if scoring_func == "sigmoid" else torch.softmax(logits, -1)
    w = s.gather(1, ids.long())
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * routed_scaling_factor


def grads_of(fn, inputs: dict, grad_out: torch.Tensor) -> dict:
    """{name: d<fn(**inputs), grad_out>/d input} for the inputs that require grad (None if unused)."""
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(**inputs)
    got = torch.autograd.grad(out, [inputs[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
    return dict(zip(names, got))


def assert_grad_close(want: torch.Tensor, got: torch.Tensor, tol: float, name: str = "") -> None:
    """``||got - want|| <= tol * (||want|| + 0.1 * sqrt(numel))``: a norm-relative error with an absolute floor of
    0.1·tol per element (RMS), so that a lone gradient that cancels to ~0 is judged on the scale of its terms."""
    err = (got.double() - want.double()).norm()
    bound = tol * (want.double().norm() + 0.1 * want.numel() ** 0.5)
    assert err <= bound, f"{name}: error {float(err):.2e} > {float(bound):.2e} (|want| = {float(want.norm()):.2e})"
