"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022;
code: mr-eggplant/EATA, eata.py and main.py).

Per test batch, as in the authors' `forward_and_adapt_eata`:

1. reliable samples: entropy H(x) < E0 = 0.4 * ln C;
2. non-redundant samples: among the reliable ones, |cos(m, p(x))| < d_margin,
   where m is the moving average of the probability vectors of the samples
   selected so far (m <- 0.9 m + 0.1 mean p(x); the first batch seeds m with its
   reliable samples and skips this filter);
3. loss = mean over the selected samples of H(x) / exp(H(x) - E0) (the weight is
   detached) + fisher_alpha * sum_i F_i (theta_i - theta_i^source)^2;
4. no selected sample: no update (as in their code).

The Fisher information F is estimated once, before adaptation, from clean
images given as context (`fisher_batches`, an iterable of (B, C, H, W) batches
in [0, 1]): squared gradients of the cross-entropy to the model's own argmax
pseudo-labels (batch-mean loss per batch, as their main.py), averaged over the
batches, on the model configured for adaptation (BN batch statistics). Without
`fisher_batches` (or with `use_fisher: false`) the method is ETA, EATA without
the regularizer; it logs a warning when EATA was asked for. "eta" is also
registered on its own.

Adapted parameters: the affine weight and bias of the normalization layers
(their code: BatchNorm2d), BN on batch statistics, model in eval mode (their
code: train mode; the same without dropout).

Defaults: the paper's CIFAR-10-C settings (Sec. 5): SGD, momentum 0.9, lr 0.005
(batch 64), E0 = 0.4 ln C, d_margin 0.4, fisher_alpha 1, 2,000 Fisher samples.
Their code only has ImageNet-C: lr 2.5e-4, d_margin 0.05, fisher_alpha 2000
(EATAConfig notes both).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.losses import weighted_entropy
from metatta.methods.common import adaptable_norm_params, configure_norm_adaptation, softmax_entropy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EATAConfig(MethodConfig):
    optimizer: str = "sgd"
    lr: float = 0.005  # paper, CIFAR-10 at batch 64 (ImageNet, their code: 0.00025)
    lr_batch_size: int | None = 64
    momentum: float = 0.9
    entropy_factor: float = 0.4  # E0 = entropy_factor * ln(num_classes)
    d_margin: float = 0.4  # paper, CIFAR-10 (ImageNet, their code: 0.05)
    probs_momentum: float = 0.9  # m <- probs_momentum * m + (1 - probs_momentum) * mean p
    use_fisher: bool = True  # EATA; false = ETA
    fisher_alpha: float = 1.0  # paper, CIFAR-10 (ImageNet, their code: 2000)


def compute_fisher(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `params`: mean over batches of the squared gradient of the
    batch-mean cross-entropy to the model's argmax pseudo-labels."""
    names = list(params)
    tensors = [params[n] for n in names]
    device = tensors[0].device
    sums = [torch.zeros_like(p) for p in tensors]
    count = 0
    with torch.enable_grad():
        for x in tqdm(batches, desc="EATA Fisher", leave=False):
            x = _image_batch(x, count).to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.detach() ** 2)
            count += 1
    if count == 0:
        raise ValueError("eata: fisher_batches is empty; give clean image batches or set use_fisher: false")
    return {n: total / count for n, total in zip(names, sums)}


def _image_batch(item: Any, index: int) -> torch.Tensor:
    # Accept a tensor or an (x, y[, domain]) batch whose first element is the images.
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"eata: fisher_batches[{index}] must be a float (B, C, H, W) image tensor, "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    return x


@register("eata")
class EATA(TTAMethod):
    Config = EATAConfig
    context_inputs = ("fisher_batches",)

    def __init__(
        self,
        model: nn.Module,
        config: EATAConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        fisher_batches: Iterable[Any] | None = None,
        **context: Any,
    ):
        super().__init__(model, config, optimizer_factory=optimizer_factory, **context)
        self._fisher: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        if self.config.use_fisher and fisher_batches is None:
            log.warning("%s: no fisher_batches given, adapting without the Fisher regularizer (this is ETA)", self.name)
        elif not self.config.use_fisher and fisher_batches is not None:
            log.info("%s: use_fisher is false; ignoring fisher_batches (ETA)", self.name)
        elif fisher_batches is not None:
            named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            fishers = compute_fisher(self.model, named, fisher_batches)
            # The anchor is the source value of each parameter (their code stores param.data).
            self._fisher = [(named[n], fishers[n], named[n].detach().clone()) for n in named]

    # ---- what EATA specifies ---------------------------------------------------------
    def configure_model(self) -> None:
        configure_norm_adaptation(self.model)

    def init_extra_state(self) -> None:
        self.moving_probs: torch.Tensor | None = None
        self.num_reliable = 0  # samples that passed the entropy filter since the last reset
        self.num_selected = 0  # ... and the redundancy filter (backward passes)
        self.last_selection: torch.Tensor | None = None  # bool mask of the latest batch

    def collect_params(self) -> list:
        return adaptable_norm_params(self.model, self.name)

    @property
    def uses_fisher(self) -> bool:
        return bool(self._fisher)

    def entropy_margin(self, num_classes: int) -> float:
        return self.config.entropy_factor * math.log(num_classes)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        margin = self.entropy_margin(logits.shape[1])
        entropy = softmax_entropy(logits)
        reliable = entropy < margin
        probs = logits.detach().softmax(1)
        selected = reliable
        if self.moving_probs is not None:
            cosine = F.cosine_similarity(self.moving_probs.unsqueeze(0), probs, dim=1)
            selected = reliable & (cosine.abs() < cfg.d_margin)
        self._update_moving_probs(probs[selected])
        self.last_selection = selected
        self.num_reliable += int(reliable.sum())
        self.num_selected += int(selected.sum())
        if not bool(selected.any()):
            return None
        loss = weighted_entropy(entropy, selected, margin)
        if self._fisher:
            loss = loss + self.fisher_penalty()
        return loss

    def fisher_penalty(self) -> torch.Tensor:
        """fisher_alpha * sum F (theta - theta_source)^2; zero without Fisher or at the source."""
        if not self._fisher:
            return torch.zeros(())
        total = sum((fisher * (p - anchor) ** 2).sum() for p, fisher, anchor in self._fisher)
        return self.config.fisher_alpha * total

    def _update_moving_probs(self, new_probs: torch.Tensor) -> None:
        if new_probs.shape[0] == 0:
            return
        mean = new_probs.mean(0)
        if self.moving_probs is None:
            self.moving_probs = mean
        else:
            m = self.config.probs_momentum
            self.moving_probs = m * self.moving_probs + (1 - m) * mean

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"moving_probs": self.moving_probs, "num_reliable": self.num_reliable,
                "num_selected": self.num_selected}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.moving_probs = state["moving_probs"]
        self.num_reliable = state["num_reliable"]
        self.num_selected = state["num_selected"]
        self.last_selection = None


@dataclasses.dataclass
class ETAConfig(EATAConfig):
    use_fisher: bool = False


@register("eta")
class ETA(EATA):
    """EATA without the Fisher regularizer (the authors' `--algorithm eta`)."""

    Config = ETAConfig
    context_inputs = ()
