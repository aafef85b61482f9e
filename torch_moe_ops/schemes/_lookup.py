"""The one name -> object resolution rule of the registry."""
from __future__ import annotations


def lookup(table: dict, name, cls: type, what: str, aliases: dict | None = None):
    """``name`` (a registered name, an alias, or already a ``cls`` object) -> the object; ValueError otherwise."""
    if isinstance(name, cls):
        return name
    obj = table.get((aliases or {}).get(name, name)) if isinstance(name, str) else None
    if obj is None:
        raise ValueError(f"{what} must be one of {tuple(table)}, got {name!r}")
    return obj
