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


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# Each elementwise function with its derivative (computed in the input's dtype: fp64 stays fp64 for gradcheck).
# Their Triton twins: ``_kernels/activation.py`` (``_elementwise``), one branch each.
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _d_gelu_tanh(x):  # 0.5(1 + t) + 0.5x(1 - t²)·y', t = tanh(y), y = c(x + 0.044715x³)
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _d_gelu(x):  # Phi(x) + x phi(x)
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


def _d_relu2(x):
    return 2.0 * torch.relu(x)


def _d_silu(x):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@dataclass(frozen=True, eq=False)
class Activation:
    """One activation between the GEMMs.

    name: canonical name (the op schemas' string). gated: w13 is ``[E, 2I, H]`` and the activation
    returns I of its 2I columns; else w13 is ``[E, I, H]``. interleaved: gate/up are even/odd rows
    (swigluoai) instead of the halves ``[0, I)`` / ``[I, 2I)``. kernel: the elementwise function's name
    in the Triton kernels (a string constexpr: ``_kernels/activation.py``'s ``_elementwise`` has its
    branch). fn / grad: the elementwise function and its derivative in torch. default_limit: the clamp
    used when the caller passes None (``0`` = off). swiglu_oai: the ``(u + 1) * g * sigmoid(alpha * g)``
    combine instead of ``f(g) * u``."""

    name: str
    gated: bool
    kernel: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]
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
        return self.apply(x.float(), self.alpha(alpha), self.limit(limit))

    def apply(self, x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
        """The forward in x's own dtype (fp64 stays fp64): x [..., N1] -> [..., I] (gated) or [..., N1].
        ``alpha`` / ``limit``: resolved floats (``self.alpha(...)``, ``self.limit(...)``)."""
        if not self.gated:
            return self.fn(x)
        g, u = self.gate_up(x)
        if self.clamps(limit):  # gate clamped from above only, up on both sides
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        if self.swiglu_oai:
            return (u + 1.0) * g * torch.sigmoid(alpha * g)
        return self.fn(g) * u

    def backward(self, x: torch.Tensor, dy: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
        """dL/dx [..., N1] from the input x [..., N1] and dL/dy [..., I] (non-gated: [..., N1]); math in dy's
        dtype. The clamp passes the gradient where ``g <= L`` (gate) and ``-L <= u <= L`` (up), like
        ``torch.clamp``."""
        x = x.to(dy.dtype)
        if not self.gated:
            return dy * self.grad(x)
        g, u = self.gate_up(x)
        clamp = self.clamps(limit)
        if clamp:
            g_pass, u_pass = g <= limit, (u >= -limit) & (u <= limit)
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        if self.swiglu_oai:  # (u + 1)·g·σ(αg)
            s = torch.sigmoid(alpha * g)
            dg = dy * (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s))
            du = dy * g * s
        else:  # f(g)·u
            dg = dy * u * self.grad(g)
            du = dy * self.fn(g)
        if clamp:
            dg, du = torch.where(g_pass, dg, 0.0), torch.where(u_pass, du, 0.0)
        out = torch.empty(*dy.shape[:-1], 2 * dy.shape[-1], dtype=dy.dtype, device=dy.device)
        og, ou = self.gate_up(out)
        og.copy_(dg)
        ou.copy_(du)
        return out

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


_silu = torch.nn.functional.silu
_SILU = dict(kernel="silu", fn=_silu, grad=_d_silu)
_GELU = dict(kernel="gelu", fn=gelu_erf, grad=_d_gelu)
_GELU_TANH = dict(kernel="gelu_tanh", fn=gelu_tanh, grad=_d_gelu_tanh)
_ALL = (
    Activation("silu", gated=True, **_SILU),
    Activation("gelu", gated=True, **_GELU),
    Activation("gelu_tanh", gated=True, **_GELU_TANH),
    # its own combine (swiglu_oai) uses no elementwise function: fn / grad are silu's, never called
    Activation("swigluoai", gated=True, kernel="swigluoai", fn=_silu, grad=_d_silu, interleaved=True,
               swiglu_oai=True, default_limit=SWIGLU_LIMIT),
    Activation("silu_no_mul", gated=False, **_SILU),
    Activation("gelu_no_mul", gated=False, **_GELU),
    Activation("gelu_tanh_no_mul", gated=False, **_GELU_TANH),
    Activation("relu2_no_mul", gated=False, kernel="relu2", fn=relu2, grad=_d_relu2),
)
#: Elementwise identity: ``quantize_activation`` runs through the activation+quantize kernel with it.
IDENTITY = Activation("identity", gated=False, kernel="identity", fn=lambda x: x, grad=torch.ones_like)

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
