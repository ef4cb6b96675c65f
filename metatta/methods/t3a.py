"""T3A: test-time template adjuster (Iwasawa & Matsuo, "Test-Time Classifier Adjustment
Module for Model-Agnostic Domain Generalization", NeurIPS 2021; code: matsuolab/T3A,
domainbed/adapt_algorithms.py).

Classifier-only and gradient-free: the network is frozen (eval mode, its source BN
statistics); T3A replaces the linear classifier by class prototypes built from a
support set of test features. As in the authors' `T3A`:

1. the support set starts from the classifier's weight rows (one per class), each
   labelled with the classifier's own prediction on it (bias included) and with the
   entropy of that prediction;
2. per test batch: z = the classifier's input features, p = classifier(z); every z
   joins the supports with the one-hot pseudo-label argmax p and entropy H(p);
3. filter: per pseudo-class, only the `filter_k` supports of lowest entropy are
   kept (the others are dropped for good); `filter_k: null` keeps all;
4. prototypes c_k = normalize(sum of the L2-normalized supports labelled k) and the
   logits are z . c_k (z not normalized, no bias), with the batch's own features
   already among the supports.

Deviations: their `filter_K = -1` (keep all) slices `[:-1]` and so drops one
support per class on every batch; `null` here keeps all, as the paper means.
Ties in entropy are kept in insertion order (a stable sort).

Default `filter_k` 100: the paper selects M from {1, 5, 20, 50, 100, all} on
held-out source data (unsupervised_adaptation.py); it publishes no single value.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from metatta.methods.base import MethodConfig, TTAMethod, register
from metatta.methods.common import classifier_layer, features_and_logits, freeze_all, softmax_entropy


@dataclasses.dataclass
class T3AConfig(MethodConfig):
    filter_k: int | None = 100  # supports kept per class (M); None: all
    classifier: str | None = None  # the linear classifier's module name; None: the last nn.Linear

    def validate(self) -> None:
        super().validate()
        if self.filter_k is not None and self.filter_k < 1:
            raise ValueError(f"t3a: config.filter_k must be >= 1 or null (keep all), got {self.filter_k}")


def select_supports(supports: torch.Tensor, labels: torch.Tensor, entropy: torch.Tensor,
                    filter_k: int | None, num_classes: int) -> torch.Tensor:
    """Indices of the supports kept: per class, the `filter_k` of lowest entropy (class order,
    then entropy order; all when `filter_k` is None)."""
    kept = []
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        order = torch.sort(entropy[members], stable=True).indices
        kept.append(members[order] if filter_k is None else members[order][:filter_k])
    return torch.cat(kept)


def prototype_logits(z: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """z . normalize(sum over supports of class k of normalize(support))."""
    one_hot = F.one_hot(labels, num_classes).to(supports.dtype)
    prototypes = F.normalize(F.normalize(supports, dim=1).t() @ one_hot, dim=0)  # (D, K)
    return z @ prototypes


@register("t3a")
class T3A(TTAMethod):
    Config = T3AConfig

    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        _, self.classifier = classifier_layer(self.model, self.config.classifier)

    @torch.no_grad()
    def init_extra_state(self) -> None:
        warmup = self.classifier.weight.detach().clone()  # (K, D): one support per class
        logits = self.classifier(warmup)
        self.num_classes = warmup.shape[0]
        self.supports, self.labels, self.entropy = warmup, logits.argmax(1), softmax_entropy(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layout(x)
        if self.config.episodic:
            self.reset()
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)
        with torch.no_grad():
            z, logits = features_and_logits(self.model, self.classifier, x)
            if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(logits).all())):
                self._count_skip("non-finite features or logits: no supports added, the model's prediction returned")
                return logits
            self.add_supports(z, self.classifier(z))
            return prototype_logits(z, self.supports, self.labels, self.num_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The prototypes' prediction without adding `x` to the supports."""
        z, _ = features_and_logits(self.model, self.classifier, x)
        return prototype_logits(z, self.supports, self.labels, self.num_classes)

    def add_supports(self, z: torch.Tensor, logits: torch.Tensor) -> None:
        supports = torch.cat([self.supports, z])
        labels = torch.cat([self.labels, logits.argmax(1)])
        entropy = torch.cat([self.entropy, softmax_entropy(logits)])
        kept = select_supports(supports, labels, entropy, self.config.filter_k, self.num_classes)
        self.supports, self.labels, self.entropy = supports[kept], labels[kept], entropy[kept]

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"supports": self.supports, "labels": self.labels, "entropy": self.entropy}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.supports, self.labels, self.entropy = state["supports"], state["labels"], state["entropy"]
