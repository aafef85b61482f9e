"""``experts_implementation="torch_moe_ops"`` works once ``torch_moe_ops`` is imported, before or after
transformers, without importing transformers (seconds) on ``import torch_moe_ops``.

transformers validates the name against its ``ExpertsInterface`` registry and has no hook for a missing one, so
the name is registered when ``transformers.integrations.moe`` executes (a one-shot import hook), or at once if it
already has. The registered function imports the real one (``integrations.transformers.experts_interface``) on
its first call; importing that module replaces it with the real one.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

NAME = "torch_moe_ops"
_MODULE = "transformers.integrations.moe"


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    from .transformers.experts_interface import torch_moe_ops_experts_forward

    return torch_moe_ops_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _register(module) -> None:
    interface = getattr(module, "ExpertsInterface", None)
    if interface is not None and NAME not in getattr(interface, "_global_mapping", {}):
        interface.register(NAME, _experts_forward)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then ``_register`` (and the finder retires once the module has executed)."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        self._loader.exec_module(module)  # if this raises, the finder stays for the next import attempt
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            _register(module)
        except Exception:  # never break importing transformers; integrations.transformers registers again
            pass

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    _busy = False  # while looking the module up through the other finders

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self)
        return spec


def install() -> None:
    """Register now if transformers' module is loaded, else when it is (idempotent)."""
    if _MODULE in sys.modules:
        _register(sys.modules[_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
