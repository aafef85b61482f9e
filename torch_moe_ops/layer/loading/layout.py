"""What the loader knows about one ``FusedMoE`` (docs/design.md §2, §5, §11): shapes and placement as
plain data, plus the pure functions that turn a checkpoint tensor into the rows of one local slot
(orientation, the TP slice, the gate/up rows of ``w13``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schemes import Activation
from .streamer import BIASES


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes and placement of one layer, no tensors.

    num_experts: logical experts E (the checkpoint's numbering). num_physical: physical slots
    (E + redundant replicas). hidden_size: H. intermediate_full: the checkpoint's I. intermediate:
    this rank's I (``intermediate_full / tp_size``). activation: gate/up layout of ``w13``.
    params_dtype: dtype of the full-precision staging. local_slots: ``[num_physical]`` physical slot ->
    local slot, -1 for another rank's (None: every slot is local, slot p = p). tp_rank, tp_size: the
    rows of gate/up and columns of down this rank holds."""

    num_experts: int
    num_physical: int
    hidden_size: int
    intermediate_full: int
    intermediate: int
    activation: Activation
    params_dtype: torch.dtype
    has_bias: bool = False
    correction_bias: bool = False
    local_slots: tuple[int, ...] | None = None
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def gated(self) -> bool:
        return self.activation.gated

    @property
    def num_local(self) -> int:
        return self.num_physical if self.local_slots is None else sum(s >= 0 for s in self.local_slots)

    @property
    def n1(self) -> int:
        """Local rows of ``w13``: 2I gated, I otherwise."""
        return self.activation.n1(self.intermediate)

    @property
    def w13_shards(self) -> int:
        """Row shards of ``w13`` that may carry a scale each (per-tensor formats): the gate and up halves
        (2), or 1 when gate/up rows are interleaved or there is no gate."""
        return 2 if self.gated and not self.activation.interleaved else 1

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one local expert's full-precision weights (w13 and w2 in ``params_dtype``)."""
        return (self.n1 + self.intermediate) * self.hidden_size * self.params_dtype.itemsize

    def local_slot(self, physical: int) -> int:
        """The local slot of global physical slot ``physical``; -1 when another rank holds it."""
        return physical if self.local_slots is None else self.local_slots[physical]

    # -- checkpoint tensor -> slot rows --------------------------------------------------------------
    def expected_shape(self, name: str, shard: str) -> tuple[int, ...]:
        """Checkpoint shape (full I) of one expert's ``shard`` of ``name`` in ``[out, in]`` order."""
        I, H = self.intermediate_full, self.hidden_size
        rows = {"w1": I, "w3": I, "w13": self.activation.n1(I), "w2": H}[shard]
        if name in BIASES:
            return (rows,)
        return (rows, I if shard == "w2" else H)

    def tp_slice(self, name: str, t: torch.Tensor, shard: str, pack: int = 1) -> torch.Tensor:
        """This TP rank's part of an oriented, checkpoint-shaped per-expert tensor (``pack``: values per element
        along ``in``, for pre-quantized packed weights: w2's column slice is in storage units)."""
        if self.tp_size == 1:
            return t
        I, If, r = self.intermediate, self.intermediate_full, self.tp_rank
        lo, hi = r * I, (r + 1) * I
        if shard in ("w1", "w3"):
            return t[lo:hi]
        if shard == "w2":
            if name == "w2_bias":  # the TP all-reduce adds it once: only TP rank 0 holds the real bias
                return t if r == 0 else torch.zeros_like(t)
            return t[:, lo // pack : hi // pack]
        # a fused w13 in the layer's row order
        if not self.gated:
            return t[lo:hi]
        if self.activation.interleaved:
            return t[2 * lo : 2 * hi]
        return torch.cat([t[lo:hi], t[If + lo : If + hi]], 0)

    def rows(self, t: torch.Tensor, shard: str) -> torch.Tensor:
        """The rows of a local w13-shaped tensor (``[N1, ...]``) that ``shard`` fills (a view)."""
        if shard in ("w13", "w2") or not self.gated:
            return t
        if self.activation.interleaved:
            return t[0::2] if shard == "w1" else t[1::2]
        return t[: self.intermediate] if shard == "w1" else t[self.intermediate :]


def orientation(shape, expected: tuple, transposed: bool | None, where: str) -> bool:
    """Whether a tensor of ``shape`` must be transposed to become ``expected`` ([out, in]): an ``[in, out]``
    export is transposed when ``transposed`` is True, or when it is None and the (non-square) shape tells it
    apart. Raises ``ValueError`` naming ``where`` for any other shape (decided on shapes alone, so a
    checkpoint can be checked from its headers before any data is read)."""
    shape, rev = tuple(shape), tuple(expected)[::-1]
    if len(expected) == 2 and transposed is True:
        if shape == rev:
            return True
    elif shape == tuple(expected):
        return False
    elif len(expected) == 2 and transposed is None and shape == rev:
        return True
    if len(expected) == 2 and transposed is True:  # the caller's layout says [in, out]
        raise ValueError(f"{where}: expected shape {list(rev)} (the transposed [in, out] layout), got {list(shape)}")
    hint = f" (or transposed {list(rev)})" if len(expected) == 2 and transposed is None else ""
    raise ValueError(f"{where}: expected shape {list(expected)}{hint}, got {list(shape)}")


def orient(t: torch.Tensor, expected: tuple, transposed: bool | None, where: str) -> torch.Tensor:
    """``t`` as ``expected`` ([out, in]) (see ``orientation``)."""
    return t.transpose(0, 1) if orientation(t.shape, expected, transposed, where) else t
