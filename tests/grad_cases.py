"""Input builders of the autograd tests: op inputs in the op's dtype, plus the fp64 copies the dense oracle
differentiates (the same values: the fp64 copies are made from the rounded op inputs)."""
from __future__ import annotations

import torch

from torch_moe_ops.reference import dequantize_weight
from torch_moe_ops.schemes import get_activation, get_quant_scheme
from torch_moe_ops.testing import quantize_experts

#: the names ``fused_experts`` differentiates, in the order of the gradient checks
DIFF = ("hidden_states", "w13", "w2", "topk_weights", "w13_bias", "w2_bias")


def random_ids(T: int, k: int, experts) -> torch.Tensor:
    """[T, k] int32 distinct ids per token drawn from ``experts``."""
    pool = torch.as_tensor(experts)
    pick = torch.rand(T, pool.numel()).argsort(dim=1)[:, :k]
    return pool[pick].to(torch.int32).contiguous()


def expert_case(T=7, E=3, k=2, H=23, I=13, activation="silu", dtype=torch.float32, bias=True, expert_map=False,
                on_input=False, limit=None, empty_expert=False, scheme="none", block_shape=None, strided=False):
    """A fused_experts case: dict with ``op`` (the op's keyword arguments, weights possibly quantized),
    ``dense`` (fp64 dense-oracle arguments with dequantized weights), ``grad`` [T, H] and ``scheme``.
    ``strided``: x, w13 and w2 are views with padded rows (only the last dim contiguous)."""
    act = get_activation(activation)
    sch = get_quant_scheme(scheme)
    w13 = torch.randn(E, act.n1(I), H) * 0.3
    w2 = torch.randn(E, H, I) * 0.3
    b13, b2 = (torch.randn(E, act.n1(I)) * 0.3, torch.randn(E, H) * 0.3) if bias else (None, None)
    x = (torch.randn(T, H) * 0.5).to(dtype)
    E_glob = E + 2 if expert_map else E
    pool = list(range(E_glob))
    if empty_expert:  # the last local expert receives no pair
        pool = pool[:-3] + pool[-2:] if expert_map else pool[:-1]
    ids = random_ids(T, k, pool)
    emap = None
    if expert_map:  # local experts at random global slots; the other two are another rank's
        emap = torch.full((E_glob,), -1, dtype=torch.int32)
        emap[torch.randperm(E_glob)[:E].sort().values] = torch.arange(E, dtype=torch.int32)
    tw = torch.rand(T, k) * 0.9 + 0.1
    q13, q2, s13, s2, block = quantize_experts(w13, w2, sch, act, block_shape)
    if sch.quantized:
        d13, d2 = _dequantized(q13, s13, sch, block), _dequantized(q2, s2, sch, block)
    else:
        q13, q2 = w13.to(dtype), w2.to(dtype)
        d13, d2 = q13.double(), q2.double()
    if strided:
        x, q13, q2 = _padded(x), _padded(q13), _padded(q2)
    b13 = b13.to(dtype) if bias else None
    b2 = b2.to(dtype) if bias else None
    lim = act.limit(limit)
    op = dict(hidden_states=x, w13=q13, w2=q2, topk_weights=tw, topk_ids=ids, activation=activation,
              w13_bias=b13, w2_bias=b2, expert_map=emap, apply_router_weight_on_input=on_input,
              activation_limit=limit)
    if sch.quantized:
        op.update(quant_scheme=sch.name, w13_scale=s13, w2_scale=s2, block_shape=list(block) if block else None)
    dense = dict(x=x.double(), w13=d13, w2=d2, tw=tw.double(), ids=ids, activation=act.name,
                 b13=b13.double() if bias else None, b2=b2.double() if bias else None, expert_map=emap,
                 on_input=on_input, alpha=act.alpha(None), limit=lim)
    return dict(op=op, dense=dense, grad=torch.randn(T, H).to(dtype), scheme=sch)


def _padded(t: torch.Tensor, extra: int = 8) -> torch.Tensor:
    """The same values in a view whose rows are ``extra`` elements longer (the padding holds NaN / 0)."""
    fill = float("nan") if t.is_floating_point() and t.element_size() > 1 else 0
    buf = torch.full((*t.shape[:-1], t.shape[-1] + extra), fill, dtype=t.dtype)
    view = buf[..., : t.shape[-1]]
    view.copy_(t)
    return view


def _dequantized(q, s, scheme, block):
    """fp64 [E, N, K] of the stored weights (what the kernels multiply by)."""
    return dequantize_weight(q, s, scheme.weight, list(block) if block else None).double()


def requires_grad(case: dict, names=DIFF) -> dict:
    """Mark ``names`` as requiring grad in both the op and the dense arguments (a fresh leaf each)."""
    dense_names = dict(hidden_states="x", w13="w13", w2="w2", topk_weights="tw", w13_bias="b13", w2_bias="b2")
    for n in names:
        if case["op"].get(n) is not None:
            case["op"][n] = case["op"][n].detach().requires_grad_()
            case["dense"][dense_names[n]] = case["dense"][dense_names[n]].detach().requires_grad_()
    return case
