"""Activation objects (docs/design.md §6): one per name, asked for layout, defaults and reference math.

``get_activation(name)`` resolves aliases once; below the op boundary code holds the object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._lookup import lookup

#: swigluoai's sigmoid slope and clamp limit (GPT-OSS); the limit default applies to swigluoai only.
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


@dataclass(frozen=True, eq=False)
class Activation:
    """One activation between the GEMMs.

    name: canonical name (the op schemas' string). gated: w13 is ``[E, 2I, H]`` and the activation
    returns I of its 2I columns; else w13 is ``[E, I, H]``. interleaved: gate/up are even/odd rows
    (swigluoai) instead of the halves ``[0, I)`` / ``[I, 2I)``. kernel: the elementwise function's name
    in the Triton kernels (a string constexpr). default_limit: the clamp used when the caller passes
    None (``0`` = off). swiglu_oai: the ``(u + 1) * g * sigmoid(alpha * g)`` combine instead of
    ``f(g) * u``."""

    name: str
    gated: bool
    kernel: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    interleaved: bool = False
    swiglu_oai: bool = False
    default_alpha: float = SWIGLU_ALPHA
    default_limit: float = 0.0

    def n1(self, intermediate: int) -> int:
        """GEMM1 output width for an intermediate size I: 2I gated, I otherwise."""
        return 2 * intermediate if self.gated else intermediate

    def alpha(self, alpha: float | None) -> float:
        return self.default_alpha if alpha is None else float(alpha)

    def limit(self, limit: float | None) -> float:
        return self.default_limit if limit is None else float(limit)

    def clamps(self, limit: float) -> bool:
        """Gated activations honour ``limit > 0`` (clamped swiglu); non-gated ones ignore it."""
        return self.gated and limit > 0

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., 2I] -> (gate [..., I], up [..., I]) views in this activation's row order."""
        if self.interleaved:
            return x[..., 0::2], x[..., 1::2]
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]

    def reference(self, x: torch.Tensor, alpha: float | None = None, limit: float | None = None) -> torch.Tensor:
        """x: [..., N1] -> fp32 [..., I] (gated) or [..., N1] (non-gated)."""
        x = x.float()
        if not self.gated:
            return self.fn(x)
        g, u = self.gate_up(x)
        lim = self.limit(limit)
        if lim > 0:  # gate clamped from above only, up on both sides
            g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        if self.swiglu_oai:
            return (u + 1.0) * g * torch.sigmoid(self.alpha(alpha) * g)
        return self.fn(g) * u

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


_silu = torch.nn.functional.silu
_ALL = (
    Activation("silu", gated=True, kernel="silu", fn=_silu),
    Activation("gelu", gated=True, kernel="gelu", fn=gelu_erf),
    Activation("gelu_tanh", gated=True, kernel="gelu_tanh", fn=gelu_tanh),
    Activation("swigluoai", gated=True, kernel="swigluoai", fn=_silu, interleaved=True, swiglu_oai=True,
               default_limit=SWIGLU_LIMIT),
    Activation("silu_no_mul", gated=False, kernel="silu", fn=_silu),
    Activation("gelu_no_mul", gated=False, kernel="gelu", fn=gelu_erf),
    Activation("gelu_tanh_no_mul", gated=False, kernel="gelu_tanh", fn=gelu_tanh),
    Activation("relu2_no_mul", gated=False, kernel="relu2", fn=relu2),
)
#: Elementwise identity: ``quantize_activation`` runs through the activation+quantize kernel with it.
IDENTITY = Activation("identity", gated=False, kernel="identity", fn=lambda x: x)

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in _ALL}
ALIASES = {"gelu_pytorch_tanh": "gelu_tanh"}
#: Names that are refused with a pointer to the right spelling.
_REFUSED = {"relu2": "activation='relu2' has no gated form; use activation='relu2_no_mul' with w13 [E, I, H]"}


def get_activation(name) -> Activation:
    """Resolve a name (or pass an ``Activation`` through); unknown names raise ``ValueError``."""
    if isinstance(name, str) and name in _REFUSED:
        raise ValueError(_REFUSED[name])
    try:
        return lookup(ACTIVATIONS, name, Activation, "activation", ALIASES)
    except ValueError:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} (or 'gelu_pytorch_tanh'), got {name!r}") from None
