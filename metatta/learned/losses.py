"""MGTTA's unsupervised test-time losses.

- "entropy": mean softmax entropy of the predictions (the paper's framing).
- "entropy+stats": entropy + lambda * sum over feature taps of
  [MSE(batch feature std, source std) + MSE(batch feature mean, source mean)],
  lambda = 0.4 (the authors' ImageNet-C setting). The features are those of
  `metatta.models.feature_stats` (the CLS token after every block for ViTs),
  and the source statistics come from `compute_feature_stats` on clean data.

Paper vs authors' code: the authors concatenate all layers' features and use
lambda * (sum of squared errors of std and mean over every dimension) / 64;
that is `stats_reduction="authors"`. The default, "per_layer_mse", is the
per-layer mean squared error summed over layers, as SPECS states it. For D-dim
features the authors' term equals the default times D / 64 (12x for ViT-B).

`reliable_factor` (beyond the paper; None: off): the entropy term becomes EATA's, the weighted
entropy of the reliable samples only (H < reliable_factor * ln C, weight 1 / exp(H - E0); a zero
loss, kept in the graph, when a batch has none), the signal EATA adapts on.

A batch of one image has no standard deviation: the std term is then left out
and only the mean term is used.

"auto" (a config value, resolved by `loss_kind_for` against the model): "entropy+stats" for a
vision transformer, the authors' ViT loss (their only model), "entropy" for anything else (the
paper's framing; the stats term is our analogue for CNNs, asked for by name). Decided from the
model itself, so a ViT source gets its loss whatever the dataset is called; the statistics it
aligns to are the ones stored in its checkpoint.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from metatta.losses import reliable_entropy, softmax_entropy
from metatta.models.feature_stats import FeatureRecorder, is_vision_transformer

LOSS_KINDS = ("entropy", "entropy+stats")
LOSS_CHOICES = ("auto", *LOSS_KINDS)  # what a config may say; "auto" is resolved by `loss_kind_for`
STATS_REDUCTIONS = ("per_layer_mse", "authors")
AUTHORS_STATS_DIVISOR = 64.0


def loss_kind_for(kind: str, model: nn.Module) -> str:
    """The loss kind a config's `kind` means on `model`: "auto" -> "entropy+stats" for a vision
    transformer (the authors' ViT loss), else "entropy"; an explicit kind as is."""
    if kind not in LOSS_CHOICES:
        raise ValueError(f"loss kind {kind!r} is not one of {LOSS_CHOICES}")
    if kind != "auto":
        return kind
    return "entropy+stats" if is_vision_transformer(model) else "entropy"


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy over the batch."""
    return softmax_entropy(logits).mean()


def stats_alignment_loss(
    features: Sequence[torch.Tensor],
    source_stats: Mapping[str, torch.Tensor],
    reduction: str = "per_layer_mse",
) -> torch.Tensor:
    """Distance of the batch's per-tap feature mean/std to the source's.

    `features[i]` has shape (B, ...) (flattened to (B, D_i)); `source_stats`
    holds "mean.<i>" and "std.<i>" of shape (D_i,) for every tap i.
    """
    if reduction not in STATS_REDUCTIONS:
        raise ValueError(f"stats reduction {reduction!r} is not one of {STATS_REDUCTIONS}")
    if not features:
        raise ValueError("stats_alignment_loss: no features were recorded (does the model have feature taps?)")
    total = features[0].new_zeros(())
    for i, f in enumerate(features):
        f = f.flatten(1)
        mean_key, std_key = f"mean.{i}", f"std.{i}"
        for key in (mean_key, std_key):
            if key not in source_stats:
                raise ValueError(f"source_stats has no {key!r} for feature tap {i} (keys: {sorted(source_stats)})")
            if source_stats[key].numel() != f.shape[1]:
                raise ValueError(
                    f"source_stats[{key!r}] has {source_stats[key].numel()} values but tap {i} gives {f.shape[1]} features"
                )
        src_mean = source_stats[mean_key].reshape(-1).to(f)
        src_std = source_stats[std_key].reshape(-1).to(f)
        if f.shape[0] > 1:
            std, mean = torch.std_mean(f, dim=0)  # unbiased std, like the source statistics
            sq = (std - src_std).pow(2)
        else:
            mean, sq = f[0], None
        mean_sq = (mean - src_mean).pow(2)
        if reduction == "per_layer_mse":
            total = total + mean_sq.mean() + (sq.mean() if sq is not None else 0.0)
        else:
            total = total + (mean_sq.sum() + (sq.sum() if sq is not None else 0.0)) / AUTHORS_STATS_DIVISOR
    return total


class TTALoss:
    """The test-time loss as one callable: `loss(logits, features=None)`.

    `needs_features` tells the caller whether to record features (with
    `record_features`) during the forward pass.
    """

    def __init__(
        self,
        kind: str = "entropy",
        source_stats: Mapping[str, torch.Tensor] | None = None,
        stats_lambda: float = 0.4,
        stats_reduction: str = "per_layer_mse",
        reliable_factor: float | None = None,
    ):
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind {kind!r} is not one of {LOSS_KINDS}")
        if stats_reduction not in STATS_REDUCTIONS:
            raise ValueError(f"stats_reduction {stats_reduction!r} is not one of {STATS_REDUCTIONS}")
        if kind == "entropy+stats" and not source_stats:
            raise ValueError("loss 'entropy+stats' needs source_stats (from metatta.models.feature_stats.compute_feature_stats)")
        if reliable_factor is not None and not 0 < reliable_factor <= 1:
            raise ValueError(f"reliable_factor must be in (0, 1] (of ln C) or None, got {reliable_factor!r}")
        self.kind = kind
        self.reliable_factor = reliable_factor
        self.source_stats = dict(source_stats) if source_stats else None
        self.stats_lambda = stats_lambda
        self.stats_reduction = stats_reduction

    @property
    def needs_features(self) -> bool:
        return self.kind == "entropy+stats"

    def any_reliable(self, logits: torch.Tensor) -> bool:
        """Whether the entropy term has a sample to adapt on (always, without `reliable_factor`)."""
        return self.reliable_factor is None or reliable_entropy(logits.detach(), self.reliable_factor) is not None

    def __call__(self, logits: torch.Tensor, features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if self.reliable_factor is None:
            loss = entropy_loss(logits)
        else:
            loss = reliable_entropy(logits, self.reliable_factor)
            loss = logits.sum() * 0.0 if loss is None else loss
        if self.needs_features:
            if features is None:
                raise ValueError("loss 'entropy+stats' needs the features recorded during the forward pass")
            loss = loss + self.stats_lambda * stats_alignment_loss(features, self.source_stats, self.stats_reduction)
        return loss

    def __repr__(self) -> str:
        extra = f", lambda={self.stats_lambda}, reduction={self.stats_reduction}" if self.needs_features else ""
        extra += f", reliable_factor={self.reliable_factor}" if self.reliable_factor is not None else ""
        return f"TTALoss({self.kind}{extra})"


class _NoFeatures:
    features: list = []


@contextlib.contextmanager
def record_features(model: nn.Module, enabled: bool = True) -> Iterator[Any]:
    """Record the feature taps of `model` (metatta.models.feature_stats) during
    forward passes inside the block; read `.features` of the yielded recorder
    after the forward (an empty list when `enabled` is False).

    The hooks go on `model` itself: for a functional copy (higher's
    monkeypatch) pass the copy, since hooks on the original do not fire there.
    """
    if not enabled:
        yield _NoFeatures()
        return
    with FeatureRecorder(model) as recorder:
        yield recorder
