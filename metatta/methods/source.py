"""Source: the unadapted model (eval mode, the source BN running statistics)."""
from __future__ import annotations

from metatta.methods.base import TTAMethod, register


@register("source")
class Source(TTAMethod):
    """No adaptation: `forward` is the model in eval mode under `torch.no_grad()`."""

    def configure_model(self) -> None:
        self.model.eval()
