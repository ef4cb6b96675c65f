"""The protocol a search validates by and chooses with (docs/searches.md), apart from the search
engine: validation streams that look like deployment, the objective, divergence, and the rule
that a searched setting replaces the published default only when it beats it by more than the
validation's seed noise.

- Validation data (`ValidationConfig`, `validation_set`): the held-out corruptions at several
  severities, built from the clean *training* split (`metatta.learned.heldout`, as the MGG's
  supervised outer loss is), never a test image; `check_provenance` refuses anything else. The
  stream has the run's setting and batch size (the search's `stream` section) and its images per
  domain (`num_images`, default: the search's `benchmark.num_images`, the run it tunes for); each
  stream seed draws its own images (`resample_images`), so the seed noise includes the draw.
- Objective (`ObjectiveConfig`): per stream seed, (1 - w) * mean error + w * worst window (the
  image-weighted error of the worst window of `window` images, `metatta.lifelong.window_errors`);
  a trial's objective is the mean over its seeds, so a setting that drifts late loses.
- Divergence (`DivergenceConfig`, `DivergenceWatch`): non-finite logits, a window above
  `max_window_error`, or the collapse guard firing stop the trial; it is recorded as diverged,
  reported to the searcher with `penalty`, and never chosen.
- Choice (`AcceptanceConfig`, `choose_setting`): the published default runs first, on the same
  seeds; the best searched trial wins only if its objective is lower than the default's by more
  than max(k * noise, min_margin), noise being the spread of the default's per-seed objectives
  (`std`, `range`) or of the per-seed differences between the best trial and the default
  (`paired_std`).
- Transfer (`spearman`): how well the validation ranks settings as the benchmark does, the
  rank correlation over a search's trials (benchmarks/search_transfer.py measures it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from metatta.config import ConfigError
from metatta.data.domains import HELD_OUT_CORRUPTIONS, check_corruption_names, check_severities
from metatta.evaluation import Progress
from metatta.learned.heldout import SPLIT, HeldOutSet, build_heldout_domains, parse_composition
from metatta.lifelong import window_errors

NOISE_RULES = ("std", "range", "paired_std")


@dataclasses.dataclass
class ValidationConfig:
    """Validation streams: held-out corruptions of clean training images (module docstring)."""

    dataset: str | None = None  # clean dataset whose training split is corrupted; None: the benchmark's
    root: str | None = None  # its files; None: the usual places (metatta.data.clean)
    corruptions: list[str] = dataclasses.field(default_factory=lambda: list(HELD_OUT_CORRUPTIONS))
    severities: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 5])
    # more held-out shifts, after the corruptions x severities: held-out corruptions applied in turn,
    # "gaussian_blur-5+speckle_noise-5" (a corruption repeated: a severity beyond 5); metatta.learned.heldout
    compositions: list[str] = dataclasses.field(default_factory=list)
    num_images: int | None = None  # per domain; None: the search's benchmark.num_images (the run's)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  # stream seeds, each run by every trial
    data_seed: int = 0  # which clean training images, and their corruption draws
    # true: stream seed s also draws its own images (data_seed + s), so the seed noise includes
    # which images were drawn, not only their order; false: every seed streams the same images
    resample_images: bool = True


@dataclasses.dataclass
class ObjectiveConfig:
    worst_window_weight: float = 0.25  # w in (1 - w) * mean error + w * worst window
    window: int | None = None  # images per window; None: the validation's images per domain


@dataclasses.dataclass
class DivergenceConfig:
    max_window_error: float | None = 80.0  # percent; a window above it stops the trial (None: no bound)
    on_collapse: bool = True  # the method's collapse guard firing stops the trial
    on_nonfinite: bool = True  # a batch of non-finite logits stops the trial
    penalty: float = 100.0  # the objective the searcher is told for a diverged trial


@dataclasses.dataclass
class AcceptanceConfig:
    # std (sample) | range (max - min) of the default's per-seed objectives; paired_std: sample std of
    # the per-seed differences best trial - default (every setting sees the same images per seed, so
    # the image draw, which moves all settings together, cancels)
    noise: str = "std"
    k: float = 1.0  # the winner must beat the default by more than k * noise ...
    min_margin: float = 0.0  # ... and by more than this many points


def check_protocol(validation: ValidationConfig, objective: ObjectiveConfig, divergence: DivergenceConfig,
                   acceptance: AcceptanceConfig, setting: str, where: str = "search") -> None:
    """Refuse protocol values that cannot be meant; errors name the field."""
    names = check_corruption_names(validation.corruptions)
    leaked = [n for n in names if n not in HELD_OUT_CORRUPTIONS]
    if leaked:
        raise ConfigError(f"{where}.validation.corruptions: {leaked} are benchmark corruptions; a search validates "
                          f"on the held-out ones only ({', '.join(HELD_OUT_CORRUPTIONS)})")
    try:
        severities = check_severities(validation.severities)
    except ValueError as e:
        raise ConfigError(f"{where}.validation.severities: {e}") from None
    compositions = validation.compositions
    for item in compositions:
        try:
            parse_composition(item)
        except ValueError as e:
            raise ConfigError(f"{where}.validation.compositions: {e}") from None
    if compositions and setting == "gradual":
        raise ConfigError(f"{where}.validation.compositions: the gradual setting runs every corruption through "
                          f"severities 1-5; a composition has one severity (leave compositions empty)")
    if len(set(compositions)) != len(compositions):
        raise ConfigError(f"{where}.validation.compositions: repeats: {compositions}")
    if not names and not compositions:
        raise ConfigError(f"{where}.validation: no corruptions and no compositions: nothing to validate on")
    if setting == "gradual" and sorted(severities) != [1, 2, 3, 4, 5]:
        raise ConfigError(f"{where}.validation.severities: the gradual setting needs severities 1-5, got {severities}")
    seeds = validation.seeds
    if not seeds or len(set(seeds)) != len(seeds) or any(not _is_int(s) or s < 0 for s in seeds):
        raise ConfigError(f"{where}.validation.seeds: a non-empty list of distinct integers >= 0, got {seeds!r}")
    if len(seeds) < 2 and (acceptance.k > 0):
        raise ConfigError(f"{where}.validation.seeds: measuring the seed noise needs at least 2 seeds, got {seeds}; "
                          f"or set {where}.acceptance.k: 0")
    if validation.num_images is not None and (not _is_int(validation.num_images) or validation.num_images < 1):
        raise ConfigError(f"{where}.validation.num_images: an integer >= 1, got {validation.num_images!r}")
    if not 0.0 <= objective.worst_window_weight <= 1.0:
        raise ConfigError(f"{where}.objective.worst_window_weight: in [0, 1], got {objective.worst_window_weight}")
    if objective.window is not None and (not _is_int(objective.window) or objective.window < 1):
        raise ConfigError(f"{where}.objective.window: an integer >= 1 (images), got {objective.window!r}")
    bound = divergence.max_window_error
    if bound is not None and not (isinstance(bound, (int, float)) and 0 <= bound <= 100):
        raise ConfigError(f"{where}.divergence.max_window_error: a percentage in [0, 100] or null, got {bound!r}")
    if acceptance.noise not in NOISE_RULES:
        raise ConfigError(f"{where}.acceptance.noise: {acceptance.noise!r} is not one of {', '.join(NOISE_RULES)}")
    if not (acceptance.k >= 0 and acceptance.min_margin >= 0):
        raise ConfigError(f"{where}.acceptance: k and min_margin must be >= 0")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---- validation data --------------------------------------------------------------------------
def validation_set(cfg: ValidationConfig, num_images: int, dataset: str, seed: int) -> HeldOutSet:
    """The validation domains of stream seed `seed` (one per corruption and severity,
    corruption-major) and their provenance, checked: clean training images only."""
    data_seed = cfg.data_seed + seed if cfg.resample_images else cfg.data_seed
    held = build_heldout_domains(cfg.corruptions, cfg.severities, num_images, dataset, cfg.root, data_seed,
                                 compositions=cfg.compositions)
    check_provenance(held.provenance)
    return held


def check_provenance(provenance: dict[str, Any]) -> None:
    """Refuse validation data that is not held-out corruptions of clean training images."""
    if provenance.get("split") != SPLIT:
        raise ValueError(f"validation data: built from the {provenance.get('split')!r} split; a search validates "
                         f"on the clean {SPLIT!r} split only (never a test image)")
    leaked = [c for c in provenance.get("corruptions", {}) if c not in HELD_OUT_CORRUPTIONS]
    if leaked:
        raise ValueError(f"validation data: {leaked} are benchmark corruptions")
    for name in provenance.get("compositions", {}):
        parse_composition(name)  # held-out parts only
    blocks = [set(v) for key in ("corruptions", "compositions") for v in provenance.get(key, {}).values()]
    if any(a & b for i, a in enumerate(blocks) for b in blocks[i + 1:]):
        raise ValueError("validation data: two corruptions (or compositions) share clean images")


def provenance_summary(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance without the index lists (for the registry and MLflow), with their count."""
    return {**{k: v for k, v in provenance.items() if k not in ("corruptions", "compositions")},
            "images_per_corruption": {c: len(v) for key in ("corruptions", "compositions")
                                      for c, v in provenance.get(key, {}).items()}}


# ---- objective and divergence -------------------------------------------------------------------
def combine(mean_error: float, worst_window: float, cfg: ObjectiveConfig) -> float:
    w = cfg.worst_window_weight
    return (1.0 - w) * mean_error + w * worst_window


class TrialDiverged(Exception):
    """Raised from the evaluation's on_batch hook to stop a trial that diverged."""

    def __init__(self, reason: str, batches: int):
        super().__init__(reason)
        self.reason, self.batches = reason, batches


class DivergenceWatch:
    """Watches one seed's evaluation batch by batch: keeps the batch errors and sizes (for the
    windows) and raises TrialDiverged when `DivergenceConfig` says the trial diverged."""

    def __init__(self, cfg: DivergenceConfig, window: int, method):
        self.cfg, self.window, self.method = cfg, window, method
        self.errors: list[float] = []
        self.sizes: list[int] = []
        self._window_wrong = self._window_images = 0.0
        self.worst_so_far: float | None = None  # worst finished window

    def __call__(self, progress: Progress) -> None:
        self.errors.append(progress.batch_error)
        self.sizes.append(progress.batch_images)
        if self.cfg.on_nonfinite and not progress.finite_logits:
            raise TrialDiverged(f"non-finite logits at batch {progress.batches}", progress.batches)
        if self.cfg.on_collapse and getattr(self.method, "collapse_events", 0) > 0:
            raise TrialDiverged(f"the collapse guard fired by batch {progress.batches}", progress.batches)
        self._window_wrong += progress.batch_error * progress.batch_images
        self._window_images += progress.batch_images
        if self._window_images >= self.window:
            error = self._window_wrong / self._window_images
            self._window_wrong = self._window_images = 0.0
            self.worst_so_far = error if self.worst_so_far is None else max(self.worst_so_far, error)
            self.check_window(error, progress.batches)

    def check_window(self, error: float, batches: int) -> None:
        bound = self.cfg.max_window_error
        if bound is not None and error > bound:
            raise TrialDiverged(f"window error {error:.1f}% above {bound:g}% by batch {batches}", batches)

    def windows(self) -> list[float]:
        return window_errors(self.errors, self.sizes, self.window)


# ---- the choice ---------------------------------------------------------------------------------
def seed_noise(values: Sequence[float], rule: str) -> float:
    """Spread of per-seed values: sample std (ddof 1) or max - min."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return 0.0
    return float(values.std(ddof=1) if rule == "std" else values.max() - values.min())


def choose_setting(default: dict[str, Any], trials: Sequence[dict[str, Any]], cfg: AcceptanceConfig,
                   metric: str = "objective") -> dict[str, Any]:
    """Default or searched? `default` and `trials` are trial records ({"trial_id", "config",
    "metrics", "completed", "diverged"}); the default's metrics hold its per-seed values
    (`seed<s>/<metric>`). Only completed, non-diverged trials compete. Returns the decision with
    its numbers: chosen ("default" | "searched"), trial_id, default and best values, seed noise,
    margin, and why."""
    seeds = sorted(k for k in default["metrics"] if k.startswith("seed") and k.endswith(f"/{metric}"))
    default_value = float(default["metrics"][metric])
    candidates = [t for t in trials if t["completed"] and not t.get("diverged")]
    best = min(candidates, key=lambda t: t["metrics"][metric]) if candidates else None
    best_value = float(best["metrics"][metric]) if best is not None else None
    if cfg.noise == "paired_std":
        missing = [] if best is None else [k for k in seeds if k not in best["metrics"]]
        if missing:
            raise ValueError(f"acceptance.noise paired_std: trial {best['trial_id']} has no {missing}")
        noise = 0.0 if best is None else seed_noise(
            [best["metrics"][k] - default["metrics"][k] for k in seeds], "std")
    else:
        noise = seed_noise([default["metrics"][k] for k in seeds], cfg.noise)
    margin = max(cfg.k * noise, cfg.min_margin)
    decision = {"default_" + metric: default_value, "best_" + metric: best_value, "seed_noise": noise,
                "noise_rule": cfg.noise, "k": cfg.k, "margin": margin, "seeds": len(seeds),
                "best_trial_id": best["trial_id"] if best is not None else None,
                "competing_trials": len(candidates), "diverged_trials": sum(bool(t.get("diverged")) for t in trials)}
    if default.get("diverged"):
        if best is None:
            raise RuntimeError("the default diverged on the validation streams and no searched trial completed")
        return {**decision, "chosen": "searched", "trial_id": best["trial_id"], "why": "the default diverged"}
    if best is not None and default_value - best_value > margin:
        return {**decision, "chosen": "searched", "trial_id": best["trial_id"],
                "why": f"beats the default by {default_value - best_value:.3f} > margin {margin:.3f}"}
    why = ("no searched trial completed without diverging" if best is None else
           f"the best searched trial beats the default by {default_value - best_value:.3f}, "
           f"not more than the margin {margin:.3f}")
    return {**decision, "chosen": "default", "trial_id": default["trial_id"], "why": why}


# ---- transfer -----------------------------------------------------------------------------------
def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span (Spearman's convention)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired values (the Pearson correlation of their average
    ranks, so ties are handled); None with fewer than 3 pairs or when either side is constant
    (no ranking to compare)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    scale = float(np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))
    if scale == 0.0:
        return None
    return float((rx * ry).sum() / scale)
