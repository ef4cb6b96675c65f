"""A label-free collapse guard that any method can wear (`guard:` in its config).

Adapting without labels can drift into a degenerate model: one or a few classes
predicted for everything, or predictions that no longer have much to do with the
input. Two signals see that without labels:

- the class marginal: the entropy of the batch's mean predicted distribution,
  divided by log(num_classes). A healthy model on a balanced stream stays near 1;
  a model that predicts one class for everything goes to 0. Free: it reads the
  logits the method has already computed.
- agreement with a reference: the fraction of the batch on which the adapted
  model's prediction matches the source model's with BatchNorm re-estimated on
  the same batch (the `bn` method; for a model without BN, the source model as
  it is). The reference does not adapt, so it cannot drift; a model that keeps
  improving on it still agrees with it on most images, a collapsing one does not.
  It costs a no-grad forward of the source model, so it runs every
  `check_every` batches.
  With `reference_confidence: p`, only the images the reference predicts with
  softmax probability >= p count. The reference's own error moves with how hard
  the stream is (about 15% on a medium CCC stream, 26% on a hard one), and a
  model that adapts well disagrees with every wrong reference prediction, so
  plain agreement calibrated on one difficulty fires on a healthy model on a
  harder one; the reference's confident predictions are right far more often
  at any difficulty.

With `relative_marginal: true` the class-marginal signal is read against the
reference too: the method's marginal entropy divided by the reference's on the
same batch (observed with the agreement, every `check_every` batches). How
unbalanced a batch's predictions are depends on the stream (how hard, which
corruption) as much as on the model; the reference sees the same batch, so the
ratio stays near 1 for a healthy model at any difficulty and falls towards 0
only when the method concentrates on fewer classes than the reference does.

Each signal is averaged over the last `window` observations, so one hard batch
does not fire the guard. When an average falls below its threshold the guard
fires: `action: reset` returns the method to the source state with a fresh
optimizer (as RDumb does on a schedule, but only when needed); `action: warn`
only counts and logs. After firing, the windows start empty again.

The thresholds are settings of the guard; `benchmarks/lifelong.py` chooses them
on the held-out corruptions only (never on the benchmark's).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import deque
from typing import Any, Literal

import torch
from torch import nn

from metatta.methods.common import BN_TYPES, use_batch_statistics

log = logging.getLogger(__name__)

GUARD_ACTIONS = ("reset", "warn")


@dataclasses.dataclass
class GuardConfig:
    action: Literal["reset", "warn"] = "reset"
    # Thresholds on windowed averages; None switches that signal off.
    min_marginal_entropy: float | None = 0.5  # entropy of the mean prediction / log(num_classes)
    min_agreement: float | None = 0.6  # fraction of images whose argmax matches the reference's
    reference_confidence: float | None = None  # count agreement only where the reference's max softmax >= this
    relative_marginal: bool = False  # marginal entropy / the reference's on the same batch (then >= 0, not <= 1)
    window: int = 8  # observations averaged before deciding
    # batches between reference forwards: the cost, amortized. A no-grad forward is about half of a
    # Tent step (ResNet-8, batch 64, CPU): every 4 batches cost 13% of Tent's time, every 8 about 5%
    # (benchmarks/guard_cost.py); a window of 8 observations then spans 64 batches.
    check_every: int = 8

    def validate(self, where: str = "guard") -> None:
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"{where}: action must be one of {GUARD_ACTIONS}, got {self.action!r}")
        for field in ("min_marginal_entropy", "min_agreement", "reference_confidence"):
            value = getattr(self, field)
            ratio = field == "min_marginal_entropy" and self.relative_marginal is True  # may exceed 1
            upper, allowed = (math.inf, ">= 0") if ratio else (1.0, "in [0, 1]")
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= upper):
                raise ValueError(f"{where}: {field} must be a number {allowed} or null, got {value!r}")
        if not isinstance(self.relative_marginal, bool):
            raise ValueError(f"{where}: relative_marginal must be true or false, got {self.relative_marginal!r}")
        if self.relative_marginal and self.min_marginal_entropy is None:
            raise ValueError(f"{where}: relative_marginal reads the class-marginal signal, which is off "
                             "(min_marginal_entropy is null)")
        for field in ("window", "check_every"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {field} must be an integer >= 1, got {value!r}")
        if self.min_marginal_entropy is None and self.min_agreement is None:
            raise ValueError(f"{where}: both signals are off (min_marginal_entropy and min_agreement are null)")


def marginal_entropy(logits: torch.Tensor) -> float:
    """Entropy of the batch's mean softmax, in units of log(num_classes): 1 uniform, 0 one class."""
    marginal = logits.float().softmax(dim=1).mean(dim=0)
    entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    return float(entropy) / math.log(logits.shape[1])


def relative_marginal_entropy(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """`marginal_entropy` of the logits over the reference's on the same batch (1: as balanced as the
    reference's predictions; 0: one class)."""
    return marginal_entropy(logits) / max(marginal_entropy(reference_logits), 1e-6)


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor, reference_confidence: float | None = None
              ) -> float | None:
    """Fraction of images whose argmax matches the reference's; with `reference_confidence`, over the
    images the reference predicts with at least that softmax probability (None if there are none)."""
    matches = logits.argmax(dim=1) == reference_logits.argmax(dim=1)
    if reference_confidence is not None:
        matches = matches[reference_logits.float().softmax(dim=1).amax(dim=1) >= reference_confidence]
        if not len(matches):
            return None
    return float(matches.float().mean())


def reference_model(source: nn.Module) -> nn.Module:
    """A frozen copy of the source model; BatchNorm layers use the batch's statistics. Convolutions in
    NHWC (channels_last): 1.2x faster on CPU for the same outputs, as the methods run them."""
    reference = copy.deepcopy(source).eval().requires_grad_(False)
    if any(isinstance(m, BN_TYPES) for m in reference.modules()):
        use_batch_statistics(reference)
    return reference.to(memory_format=torch.channels_last)


class CollapseGuard:
    """Watches a method's predictions batch by batch; `observe` says when it has collapsed."""

    def __init__(self, config: GuardConfig, source: nn.Module | None = None, where: str = "guard"):
        config.validate(where)
        self.config = config
        self.where = where
        needs_reference = config.min_agreement is not None or config.relative_marginal
        if needs_reference and source is None:
            raise ValueError(f"{where}: min_agreement and relative_marginal need the source model for its reference")
        self.reference = reference_model(source) if needs_reference else None
        self.fired = 0  # times the guard fired (never cleared by a reset)
        self._batches = 0
        self._marginals: deque[float] = deque(maxlen=config.window)
        self._agreements: deque[float] = deque(maxlen=config.window)

    def observe(self, x: torch.Tensor, logits: torch.Tensor) -> bool:
        """Record one batch (its input and the method's logits); True when the guard fires."""
        cfg = self.config
        if cfg.min_marginal_entropy is not None and len(logits) > 1 and not cfg.relative_marginal:
            self._marginals.append(marginal_entropy(logits))
        if self.reference is not None and self._batches % cfg.check_every == 0:
            with torch.no_grad():
                x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                reference_logits = self.reference(x)
            if cfg.min_agreement is not None:
                value = agreement(logits, reference_logits, cfg.reference_confidence)
                if value is not None:
                    self._agreements.append(value)
            if cfg.relative_marginal and len(logits) > 1:
                self._marginals.append(relative_marginal_entropy(logits, reference_logits))
        self._batches += 1
        why = self._collapse_reason()
        if why is None:
            return False
        self.fired += 1
        log.warning("%s: collapse suspected (%s); %s", self.where, why,
                    "resetting to the source state" if cfg.action == "reset" else "warning only")
        self._marginals.clear()
        self._agreements.clear()
        return True

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on exactly as an uninterrupted one would."""
        return {"fired": self.fired, "batches": self._batches, "marginals": list(self._marginals),
                "agreements": list(self._agreements)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.fired, self._batches = state["fired"], state["batches"]
        self._marginals = deque(state["marginals"], maxlen=self.config.window)
        self._agreements = deque(state["agreements"], maxlen=self.config.window)

    def _collapse_reason(self) -> str | None:
        cfg = self.config
        if len(self._marginals) == cfg.window:
            mean = sum(self._marginals) / cfg.window
            if mean < cfg.min_marginal_entropy:
                relative = " over the BN-adapted source's" if cfg.relative_marginal else ""
                return f"class-marginal entropy{relative} {mean:.3f} < {cfg.min_marginal_entropy}"
        if len(self._agreements) == cfg.window:
            mean = sum(self._agreements) / cfg.window
            if mean < cfg.min_agreement:
                return f"agreement with the BN-adapted source {mean:.3f} < {cfg.min_agreement}"
        return None
