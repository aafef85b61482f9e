"""Expert placement tables (docs/design.md §5): linear placement, ``expert_map``, EPLB tables, replica choice."""
from __future__ import annotations

import torch

#: Knuth's multiplicative hash constant (2^32 / golden ratio)
KNUTH = 2654435761


def linear_ranges(num_physical: int, ep_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each EP rank: contiguous blocks; the first ``num_physical % ep_size`` ranks get one
    extra expert."""
    base, extra = divmod(num_physical, ep_size)
    out, start = [], 0
    for r in range(ep_size):
        n = base + (1 if r < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def owner_of(num_physical: int, ep_size: int) -> torch.Tensor:
    """``[E_g]`` int64: EP rank that holds each physical expert."""
    owner = torch.empty(num_physical, dtype=torch.int64)
    for r, (s, e) in enumerate(linear_ranges(num_physical, ep_size)):
        owner[s:e] = r
    return owner


def expert_map(num_physical: int, ep_size: int, ep_rank: int) -> torch.Tensor:
    """``[E_g]`` int32 global physical id -> local id, -1 for other ranks' experts."""
    s, e = linear_ranges(num_physical, ep_size)[ep_rank]
    m = torch.full((num_physical,), -1, dtype=torch.int32)
    m[s:e] = torch.arange(e - s, dtype=torch.int32)
    return m


def initial_physical_to_logical(num_logical: int, num_redundant: int) -> torch.Tensor:
    """Slot ``p < E_log`` holds logical ``p``; slot ``E_log + j`` holds logical ``j mod E_log``."""
    p = torch.arange(num_logical + num_redundant, dtype=torch.int64)
    return torch.where(p < num_logical, p, (p - num_logical) % num_logical)


def tables_from_physical_to_logical(p2l: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logical_to_physical [E_log, max_replicas] int32 padded -1, replica_count [E_log] int32)``; replicas in
    increasing physical order."""
    p2l = p2l.to(torch.int64).cpu()  # host-ok: placement tables are built on the host
    if p2l.numel() and (p2l.min() < 0 or p2l.max() >= num_logical):
        raise ValueError(f"physical_to_logical entries must be in [0, {num_logical}), got {p2l.tolist()}")  # host-ok: error message
    count = torch.bincount(p2l, minlength=num_logical)
    if (count == 0).any():
        raise ValueError(f"logical experts {torch.nonzero(count == 0).flatten().tolist()} have no physical slot")  # host-ok: error message
    l2p = torch.full((num_logical, int(count.max())), -1, dtype=torch.int32)
    fill = [0] * num_logical
    for p, l in enumerate(p2l.tolist()):  # host-ok: host tables
        l2p[l, fill[l]] = p
        fill[l] += 1
    return l2p, count.to(torch.int32)


def physical_to_logical_from_table(l2p: torch.Tensor, num_physical: int) -> torch.Tensor:
    """Invert a ``logical_to_physical`` table; every physical slot must appear exactly once."""
    l2p = torch.as_tensor(l2p).to(torch.int64).cpu()  # host-ok: host tables
    if l2p.dim() != 2:
        raise ValueError(f"logical_to_physical must be [E_log, max_replicas], got {list(l2p.shape)}")
    p2l = torch.full((num_physical,), -1, dtype=torch.int64)
    for l, row in enumerate(l2p.tolist()):  # host-ok: host tables
        for p in row:
            if p < 0:
                continue
            if p >= num_physical:
                raise ValueError(f"logical_to_physical: physical id {p} out of range [0, {num_physical})")
            if p2l[p] >= 0:
                raise ValueError(f"logical_to_physical: physical slot {p} is used twice")
            p2l[p] = l
    if (p2l < 0).any():
        raise ValueError(f"logical_to_physical leaves physical slots {torch.nonzero(p2l < 0).flatten().tolist()} unused")  # host-ok: error message
    return p2l


def token_hash(num_tokens: int, device, x: torch.Tensor | None = None) -> torch.Tensor:
    """``h(t) = (t * 2654435761) mod 2^32`` for t in [0, T) (int64), identical on every rank. With ``x`` [T, H]
    (batch-invariant mode), t is the sum of the token's bit patterns instead of its position: a token picks the
    same replica wherever it sits in whatever batch (docs/batch-invariance.md)."""
    if x is None:
        t = torch.arange(num_tokens, device=device, dtype=torch.int64)
    else:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        t = x.contiguous().view(ints).long().sum(1)  # exact integer sums: no rounding, no order
    return (t * KNUTH) & 0xFFFFFFFF


def map_logical_to_physical(topk_ids: torch.Tensor, l2p: torch.Tensor, replica_count: torch.Tensor,
                            x: torch.Tensor | None = None) -> torch.Tensor:
    """``phys = l2p[l, h(t) mod replica_count[l]]`` for logical ids ``topk_ids [T, k]``; returns int32 [T, k].
    ``x`` [T, H]: hash the tokens' contents, not their positions (``token_hash``)."""
    ids = topk_ids.long()
    h = token_hash(ids.shape[0], ids.device, x).unsqueeze(1)
    replica = h % replica_count.long()[ids]
    return l2p.long()[ids, replica].to(torch.int32)
