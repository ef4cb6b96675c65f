"""Joint-training TTT (Sun et al., ICML 2020), and the base class it shares with CTA.

`SelfSupervisedTTA`: the network is a `MultiHeadNet` (an encoder, the
classifier, an auxiliary self-supervised head). Per test batch the encoder is
updated with the auxiliary loss for `steps` steps, then the batch is predicted
with the updated encoder (`steps: 0` predicts without adapting: the "before
adaptation" row). All encoder parameters adapt; the classifier and the
auxiliary head stay frozen. BN layers of the encoder normalize with the
statistics of the batch they see (no running buffers), for the loss and the
prediction alike.

Inputs: the trained network comes from an adapter (`<kind>_model`, built by
`metatta.experiment` from `adapter: models:/<kind>@champion`), or is passed as
the model itself. Without one, the source model is split into encoder and
classifier with a fresh, seeded head: only meaningful for smoke tests.

TTT: the auxiliary task is rotation prediction (`metatta.ssl.rotation`) with a
head on the shared encoder's pooled features, trained jointly with the
classifier by trainers/cta.py. At test time every image is rotated four ways
(the authors' "expand") and the encoder takes the rotation loss; nothing is
cropped or mirrored at test time, so TTT has no `hflip` (CTA's views do).

Choices the papers leave open here, and why:
- the Y-split is at the pooled features (the head is a 2-layer MLP), not after
  the second of three stages as in Sun et al.'s ResNet-26: the heads of TTT and
  CTA then sit at the same place;
- Adam, lr 1e-4 (a sweep on the held-out corruptions picked it; Sun et al. use
  SGD 1e-3 on a larger network and batch 1);
- `episodic: false` by default (online, as every method of the library; Sun
  et al.'s TTT-online); `episodic: true` starts every batch from the trained
  weights, as their standard TTT does per sample, and is what
  benchmarks/cta.py reports.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import freeze_all, use_batch_statistics
from metatta.ssl.networks import MultiHeadNet, build_network
from metatta.ssl.rotation import NUM_ROTATIONS, rotate_batch, rotation_loss


@dataclasses.dataclass
class SelfSupervisedTTAConfig(MethodConfig):
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int = 1  # auxiliary-loss updates per batch before predicting; 0: predict without adapting
    episodic: bool = False  # true: reset to the trained weights before every batch
    head_hidden: int = 128  # only for the fresh head made when no trained network is given

    min_steps: ClassVar[int] = 0


class SelfSupervisedTTA(TTAMethod):
    """Adapt the encoder of a MultiHeadNet with an auxiliary loss, then predict."""

    Config = SelfSupervisedTTAConfig
    head_name: ClassVar[str] = ""
    adapter_input: ClassVar[str] = ""  # the context input holding the trained network

    def __init__(self, model: nn.Module, config: SelfSupervisedTTAConfig | None = None,
                 optimizer_factory: OptimizerFactory | None = None, **context: Any):
        net = context.pop(self.adapter_input, None)
        config = self.checked_config(config)
        if net is None:
            net = model if isinstance(model, MultiHeadNet) else self._fresh_network(model, config)
        if not isinstance(net, MultiHeadNet):
            raise TypeError(f"{self.name}: {self.adapter_input} must be a MultiHeadNet, got {type(net).__name__}")
        net.head(self.head_name)  # a network without the auxiliary head fails here, naming it
        device = next(model.parameters()).device
        config = self.config_for_network(config, net)
        super().__init__(net.to(device), config, optimizer_factory=optimizer_factory, **context)

    @classmethod
    def config_for_network(cls, config: SelfSupervisedTTAConfig, net: MultiHeadNet) -> SelfSupervisedTTAConfig:
        """`config` with what it leaves to the trained network resolved (default: nothing)."""
        return config

    def _fresh_network(self, model: nn.Module, config: SelfSupervisedTTAConfig) -> MultiHeadNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_network(model, {self.head_name: [config.head_hidden, self.head_outputs(config)]})

    def head_outputs(self, config: SelfSupervisedTTAConfig) -> int:
        """Output size of a fresh auxiliary head."""
        raise NotImplementedError

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        use_batch_statistics(self.model.encoder)
        self.model.encoder.requires_grad_(True)

    def collect_params(self) -> list:
        return [p for p in self.model.encoder.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.steps == 0:
            return self.predict(x)
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)  # before the episodic reset: an unusable batch changes nothing
        super().forward(x)  # episodic reset, `steps` guarded updates
        return self.predict(x)  # the prediction of the updated encoder

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = self.auxiliary_loss(x)
            if not bool(torch.isfinite(loss)):
                self.refuse_update()
            elif loss.requires_grad:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return loss.detach()


@register("ttt")
class TTT(SelfSupervisedTTA):
    head_name = "rotation"
    adapter_input = "ttt_model"
    context_inputs = ("ttt_model",)

    def head_outputs(self, config: SelfSupervisedTTAConfig) -> int:
        return NUM_ROTATIONS

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        rotated, labels = rotate_batch(x, "expand")
        return rotation_loss(self.model(rotated, head=self.head_name), labels)
