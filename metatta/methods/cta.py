"""CTA: test-time training with cross-task alignment (Barbeau et al., 2025).

The network (trainers/cta.py): an SSL encoder trained with SimCLR, then
aligned to the frozen supervised encoder (symmetric InfoNCE), feeding the
frozen supervised classifier; SimCLR's projection head is kept for test time.
Per test batch the encoder is updated with the SimCLR loss on two batched
augmentations of the unlabeled batch (`metatta.ssl`) for `steps` steps, then
the batch is predicted (`steps: 0`: before adaptation). All encoder
parameters adapt, as the paper says (no choice of update layers); the
classifier and the projector stay frozen. The shared machinery (BN on batch
statistics, episodic reset, the update-then-predict loop) is
`metatta.methods.ttt.SelfSupervisedTTA`.

Choices the paper leaves open: the test-time augmentations and temperature are
those of training (SimCLR's CIFAR recipe, temperature 0.5), horizontal flips
included only when the network was trained with them (`hflip: auto` reads the
adapter's record, `MultiHeadNet.trained_augmentation`: digits are never
mirrored; an adapter without the record flips, as before it was kept;
`hflip: true | false` overrides); Adam, lr 1e-4,
online by default (`episodic: true` resets before every batch), as for TTT, so
that the two differ only in what they were trained with.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from metatta.methods.base import register
from metatta.methods.ttt import SelfSupervisedTTA, SelfSupervisedTTAConfig
from metatta.ssl.augment import SimCLRAugment
from metatta.ssl.networks import MultiHeadNet
from metatta.ssl.simclr import nt_xent


@dataclasses.dataclass
class CTAConfig(SelfSupervisedTTAConfig):
    temperature: float = 0.5  # NT-Xent temperature (training's)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # SimCLR random resized crop, area fraction
    projection_dim: int = 64  # only for the fresh head made when no trained network is given
    # horizontal flips in the test-time views; auto: as the trained network was trained (its adapter's
    # record; flips when there is none); true / false: regardless of the network
    hflip: bool | Literal["auto"] = "auto"

    def validate(self) -> None:
        super().validate()
        if not self.temperature > 0:
            self.refuse("temperature", "> 0")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            self.refuse("crop_scale", "(low, high) with 0 < low <= high <= 1")
        if not (isinstance(self.hflip, bool) or self.hflip == "auto"):
            self.refuse("hflip", "'auto', true or false")


@register("cta")
class CTA(SelfSupervisedTTA):
    Config = CTAConfig
    head_name = "projector"
    adapter_input = "cta_model"
    context_inputs = ("cta_model",)

    @classmethod
    def config_for_network(cls, config: CTAConfig, net: MultiHeadNet) -> CTAConfig:
        """hflip auto resolved from what the network was trained with (recorded results then say
        which views were used)."""
        if config.hflip != "auto":
            return config
        return dataclasses.replace(config, hflip=net.trained_augmentation.get("hflip", True))

    @property
    def augment(self) -> SimCLRAugment:
        return SimCLRAugment(crop_scale=tuple(self.config.crop_scale), hflip_prob=0.5 if self.config.hflip else 0.0)

    def head_outputs(self, config: CTAConfig) -> int:
        return config.projection_dim

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) < 2:  # NT-Xent needs negatives: a batch of one is predicted without adapting
            return torch.zeros((), device=x.device)
        v1, v2 = self.augment.views(x)
        z = self.model(torch.cat([v1, v2]), head=self.head_name)  # one pass: BN sees both views
        return nt_xent(*z.chunk(2), temperature=self.config.temperature)
