"""The one name -> object resolution rule of the registry."""
from __future__ import annotations


def lookup(table: dict, name, cls: type, what: str, aliases: dict | None = None):
    """``name`` (a registered name, an alias, or already a ``cls`` object) -> the object; ValueError otherwise,
    listing every name the argument accepts."""
    if isinstance(name, cls):
        return name
    aliases = aliases or {}
    obj = table.get(aliases.get(name, name)) if isinstance(name, str) else None
    if obj is None:
        also = f" (or an alias: {', '.join(f'{a!r} = {t!r}' for a, t in aliases.items())})" if aliases else ""
        raise ValueError(f"{what} must be one of {tuple(table)}{also}, got {name!r}")
    return obj
