"""``LoadReport``: what ``load_checkpoint`` / ``reload_weights`` did with each checkpoint tensor."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What ``load_checkpoint`` / ``reload_weights`` did with each checkpoint tensor."""

    loaded: list[str] = field(default_factory=list)  #: checkpoint names that were loaded
    ignored: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> why it was not loaded
    layers: dict[str, int] = field(default_factory=dict)  #: FusedMoE path -> tensors loaded into it
    other: dict[str, str] = field(default_factory=dict)  #: checkpoint name -> model parameter it filled
    nbytes: int = 0  #: bytes of checkpoint data loaded
    layer_status: dict[str, str] = field(default_factory=dict)  #: after finalize: loaded|reloaded|unchanged
    ignored_files: dict[str, str] = field(default_factory=dict)  #: file of a folder that was not read -> why
    model_type: str | None = None  #: the model type that decided the expert layouts (None: unknown)

    def __str__(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors ({self.nbytes / 2**20:.1f} MiB): "
                f"{sum(self.layers.values())} into {len(self.layers)} FusedMoE layers, {len(self.other)} into other "
                f"parameters; ignored {len(self.ignored)}")
        if self.ignored:
            shown = list(self.ignored.items())[:10]
            text += ": " + "; ".join(f"{n} ({why})" for n, why in shown) + (" ..." if len(self.ignored) > 10 else "")
        if self.ignored_files:
            text += "; files not read: " + "; ".join(f"{f} ({why})" for f, why in self.ignored_files.items())
        return text


__all__ = ["LoadReport"]
