"""Source: the unadapted model (eval mode, the source BN running statistics)."""
from __future__ import annotations

import dataclasses

from metatta.methods.base import MethodConfig, TTAMethod, register


@dataclasses.dataclass
class SourceMethodConfig(MethodConfig):
    """The source model adapts nothing: only the shared fields apply."""


@register("source")
class Source(TTAMethod):
    """No adaptation: `forward` is the model in eval mode under `torch.no_grad()`."""

    Config = SourceMethodConfig

    def configure_model(self) -> None:
        self.model.eval()
