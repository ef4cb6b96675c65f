"""How fast a method adapts: metrics on the error over the stream of a `Result`.

A `Result` records the error of every batch (`error_over_stream`) and its domain
(`batch_domains`). From them:

- `error_curve`: the error at the b-th adaptation batch, averaged over the domains
  (the domains are the episodes of an episodic stream);
- `early_error`: the mean error over the first batches of every domain;
- `batches_to_reach`: the first batch whose trailing mean of the curve is at or below a
  target error (e.g. another method's final error);
- `batches_to_within`: the batches needed to come within a tolerance of the curve's own
  final error.
"""
from __future__ import annotations

import numpy as np

from metatta.evaluation import Result

EARLY_BATCHES = 3


def early_error(result: Result, batches: int = EARLY_BATCHES) -> float:
    """Mean error over the first `batches` batches of every domain: how fast a method adapts."""
    seen: dict[str, int] = {}
    errors = []
    for domain, error in zip(result.batch_domains, result.error_over_stream):
        seen[domain] = seen.get(domain, 0) + 1
        if seen[domain] <= batches:
            errors.append(error)
    return float(np.mean(errors))


def error_curve(result: Result) -> list[float]:
    """Error (%) at the b-th adaptation batch, averaged over the domains that have a b-th batch."""
    per_domain: dict[str, list[float]] = {}
    for domain, error in zip(result.batch_domains, result.error_over_stream):
        per_domain.setdefault(domain, []).append(error)
    longest = max(len(e) for e in per_domain.values())
    return [float(np.mean([e[b] for e in per_domain.values() if len(e) > b])) for b in range(longest)]


def trailing_means(curve: list[float], window: int) -> np.ndarray:
    """means[i]: the mean of batches i..i+window-1 (window clipped to the curve's length)."""
    window = max(1, min(window, len(curve)))
    return np.convolve(curve, np.ones(window) / window, mode="valid")


def batches_to_reach(curve: list[float], target: float, window: int = 5) -> int | None:
    """The first b whose trailing `window`-batch mean of the curve is at or below `target`
    (e.g. Tent's final error); None when the curve never gets there."""
    smooth = trailing_means(curve, window)
    hits = np.flatnonzero(smooth <= target)
    return int(hits[0]) + len(curve) - len(smooth) + 1 if len(hits) else None


def batches_to_within(curve: list[float], tolerance: float = 0.2, window: int = 5) -> tuple[int | None, float]:
    """(batches needed, final error): the first b whose trailing `window`-batch mean of the curve
    is within `tolerance` points of the final error, the mean of the last `window` batches.

    One batch of 64 has a standard error of several points; averaged over 15 domains and a
    window of batches it is a fraction of a point, which the 0.2 tolerance needs."""
    final = float(trailing_means(curve, window)[-1])
    return batches_to_reach(curve, final + tolerance, window), final
