"""Input builders shared by the op tests (random data is seeded per test by ``tests/conftest.py``)."""
from __future__ import annotations

import torch


def moe_problem(T: int, E: int, K: int, H: int, I: int, dtype=torch.bfloat16) -> tuple:
    """(x [T, H], w13 [E, 2I, H], w2 [E, H, I] in ``dtype``, router weights and ids [T, K] from ``topk_route``)."""
    import torch_moe_ops

    x = torch.randn(T, H, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H) / 10).to(dtype)
    w2 = (torch.randn(E, H, I) / 10).to(dtype)
    weights, ids = torch_moe_ops.topk_route(torch.randn(T, E), K, renormalize=True)
    return x, w13, w2, weights, ids


def random_ids(T: int, k: int, E: int, experts=None, dtype=torch.int32) -> torch.Tensor:
    """[T, k] distinct expert ids per token, drawn from ``experts`` (default: all E)."""
    pool = torch.arange(E) if experts is None else torch.as_tensor(experts)
    assert k <= pool.numel()
    pick = torch.rand(T, pool.numel()).argsort(dim=1)[:, :k]
    return pool[pick].to(dtype).contiguous()


def random_weights(T: int, k: int) -> torch.Tensor:
    """[T, k] positive fp32 router weights (not normalised: the op must not assume they sum to 1)."""
    return (torch.rand(T, k) * 0.9 + 0.1).contiguous()


def random_expert_map(E_global: int, E_local: int) -> torch.Tensor:
    """[E_global] int32 global -> local id for a random subset of E_local experts, -1 elsewhere."""
    local = torch.randperm(E_global)[:E_local].sort().values
    emap = torch.full((E_global,), -1, dtype=torch.int32)
    emap[local] = torch.arange(E_local, dtype=torch.int32)
    return emap


def padded(t: torch.Tensor, extra: int = 128) -> torch.Tensor:
    """The same values as ``t`` in a view whose rows are ``extra`` elements longer (stride(-2) padded)."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + extra), float("nan") if t.is_floating_point() else 0, dtype=t.dtype)
    view = buf[..., : t.shape[-1]]
    view.copy_(t)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view
