"""RDumb (Press, Schneider, Kümmerer & Bethge, "RDumb: A simple approach that questions our
progress in continual test-time adaptation", NeurIPS 2023; code: oripress/CCC, and the
broadest public TTA codebase's version, mariodoebler/test-time-adaptation
MODEL.RESET_AFTER_NUM_UPDATES with ETA).

ETA (`metatta.methods.eata`: EATA without the Fisher regularizer) whose model,
optimizer and own state are reset to the source every `reset_every` (1,000)
adaptation steps, counted as their base class counts them: one per
`forward_and_adapt` call, whether or not a sample was selected (a step whose logits
are not finite is not counted: under the non-finite guard such a step changes nothing).

Defaults: `reset_every` 1000 (paper and both codes) on this project's ETA settings
(the EATA paper's CIFAR-10 values); the broadest codebase's CIFAR-10-C row (Adam
lr 1e-3, batch 200) is configs/methods/rdumb_cifar.yaml, the paper's ImageNet
setting (EATA's ImageNet code: SGD lr 0.00025, d_margin 0.05, batch 64) is
configs/methods/rdumb_imagenet.yaml.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from metatta.methods.base import register
from metatta.methods.eata import ETA, ETAConfig


@dataclasses.dataclass
class RDumbConfig(ETAConfig):
    reset_every: int = 1000  # adaptation steps between two resets to the source

    def validate(self) -> None:
        base_validate = getattr(super(), "validate", None)  # MethodConfig.validate, once the base has one
        if base_validate is not None:
            base_validate()
        if self.reset_every < 1:
            raise ValueError(f"rdumb: config.reset_every must be >= 1, got {self.reset_every}")


@register("rdumb")
class RDumb(ETA):
    Config = RDumbConfig

    def __init__(self, model, config: RDumbConfig | None = None, optimizer_factory=None, **context: Any):
        config = config if config is not None else RDumbConfig()
        config.validate()
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        self.resets = 0  # diagnostic: resets made (not reset by reset())

    def init_extra_state(self) -> None:
        super().init_extra_state()
        self.steps_since_reset = 0

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward_and_adapt(x)
        if not bool(torch.isfinite(logits).all()):
            return logits  # the non-finite guard's rule: such a step changes nothing, the count included
        self.steps_since_reset += 1
        if self.steps_since_reset >= self.config.reset_every:
            self.reset()  # also sets steps_since_reset back to 0
            self.resets += 1
        return logits

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "steps_since_reset": self.steps_since_reset}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.steps_since_reset = state["steps_since_reset"]
