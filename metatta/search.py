"""Hyperparameter searches of a TTA method, without the search engine: the search config and
its checks, one trial as a plain function, and the chosen setting's file.

A search (`SearchConfig`, one YAML file per method family, configs/fmnist_c/tune_<family>.yaml)
names a method, its fixed config, a search space over fields of the method's config, and the
run the setting is for (`benchmark`: its images per domain; `stream`: its setting and batch size).
A trial (`run_trial`) builds the method on a fresh copy of the source model as an experiment row
is built (`metatta.experiment.build_row_method`, so any method can be tuned: EATA with its Fisher
batches, a plug-in with its base's inputs) and runs it through the one evaluation loop
(`metatta.evaluation.evaluate`) on *validation* streams that look like that run: the held-out
corruptions at several severities, built from the clean training split, never a test image, once
per stream seed (`metatta.search_protocol`: data, objective, divergence, the default-or-searched
rule). It reports its running objective every `report_every` batches; the last report is the
trial's result (`final: 1`). `trainers.tune` runs the default and the trials with Ray Tune
(Optuna + ASHA). The protocol is described in docs/searches.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from metatta.config import ConfigError, build_dataclass
from metatta.data.streams import build_stream
from metatta.device import resolve_device
from metatta.evaluation import Progress, evaluate
from metatta.experiment import BenchmarkConfig, MethodSpec, SourceConfig, StreamConfig, build_row_method
from metatta.learned.heldout import HeldOutSet
from metatta.methods.base import method_class
from metatta.models import load_source_model
from metatta.search_protocol import (AcceptanceConfig, DivergenceConfig, DivergenceWatch, ObjectiveConfig,
                                     TrialDiverged, ValidationConfig, check_protocol, combine, spearman,
                                     validation_set)


SPACE_TYPES = ("loguniform", "uniform", "int", "choice")
METRICS = ("objective", "mean_error")


@dataclasses.dataclass
class SpaceParam:
    """One searched field: loguniform/uniform floats in [low, high], int in
    [low, high] (both inclusive), or a choice among `values`."""

    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


@dataclasses.dataclass
class ASHAConfig:
    enabled: bool = True
    # reports (of `report_every` batches) before a trial may be stopped; None: the reports of one
    # seed's whole validation stream, so no trial is stopped on a prefix of the stream (its first
    # domains, which may rank settings unlike the whole: docs/searches.md)
    grace_period: int | None = 2
    reduction_factor: int = 2


def _benchmark_run() -> BenchmarkConfig:
    return BenchmarkConfig(corruptions="benchmark", num_images=1000)


@dataclasses.dataclass
class SearchConfig:
    name: str = "tune"
    method: str = "tent"
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # fixed fields
    space: dict[str, SpaceParam] = dataclasses.field(default_factory=dict)  # searched fields
    # The published default's values of searched fields where they are not the method's defaults
    # (a configs/methods/<method>_<benchmark>.yaml); the default is the first trial of every search.
    default: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The run the setting is for (never read by a trial): its dataset and images per domain; with
    # `stream` (its setting and batch size) it shapes the validation streams.
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=_benchmark_run)
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    divergence: DivergenceConfig = dataclasses.field(default_factory=DivergenceConfig)
    acceptance: AcceptanceConfig = dataclasses.field(default_factory=AcceptanceConfig)
    fisher_images: int = 500  # clean training images for methods that need source statistics (EATA)
    adapter: str | None = None  # a trained adapter, for methods that take one (mgtta, cta, ttt, optimizer: mgg)
    num_samples: int = 16
    max_concurrent: int = 2
    report_every: int = 1  # batches between reports to Tune (ASHA's time unit), counted over all seeds
    asha: ASHAConfig = dataclasses.field(default_factory=ASHAConfig)
    metric: str = "objective"  # objective | mean_error (the mean over seeds, no worst window)
    mode: str = "min"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 where the cluster has a GPU and device is not cpu
    seed: int = 0
    device: str = "auto"
    output_dir: str = "outputs"
    register_as: str | None = None  # registered model name; default "<method>_settings"; "" to skip
    mlflow: bool = True
    experiment: str = "metatta"  # MLflow experiment


def search_config(data: dict[str, Any]) -> SearchConfig:
    """Parse and check a search YAML mapping; errors name the field."""
    cfg = build_dataclass(SearchConfig, data, where="search")
    space = {}
    for key, value in (cfg.space or {}).items():
        if isinstance(value, SpaceParam):
            space[key] = value
        elif isinstance(value, dict):
            space[key] = build_dataclass(SpaceParam, value, where=f"search.space.{key}")
        else:
            raise ConfigError(f"search.space.{key}: expected a mapping like {{type: loguniform, low: .., high: ..}}, "
                              f"got {value!r}")
    cfg.space = space
    cls = method_class(cfg.method)
    cfg.benchmark.corruption_names()  # a known set or names
    check_protocol(cfg.validation, cfg.objective, cfg.divergence, cfg.acceptance, cfg.stream.setting)
    if cfg.stream.setting == "gradual" and sorted(cfg.benchmark.severities) != [1, 2, 3, 4, 5]:
        raise ConfigError(f"search.benchmark.severities: the gradual run the setting is for goes through severities "
                          f"1-5, got {cfg.benchmark.severities}")
    validation_images(cfg)
    if cfg.mode != "min":
        raise ConfigError(f"search.mode: errors are minimized; got {cfg.mode!r}")
    if cfg.metric not in METRICS:
        raise ConfigError(f"search.metric: one of {', '.join(METRICS)}, got {cfg.metric!r}")
    for field in ("num_samples", "max_concurrent", "report_every"):
        if getattr(cfg, field) < 1:
            raise ConfigError(f"search.{field} must be >= 1, got {getattr(cfg, field)}")
    if (cfg.asha.grace_period is not None and cfg.asha.grace_period < 1) or cfg.asha.reduction_factor < 2:
        raise ConfigError("search.asha: grace_period must be >= 1 (or null: one seed's stream) and "
                          "reduction_factor >= 2")
    if not cfg.space:
        raise ConfigError("search.space is empty; give at least one field to search")
    known = {f.name for f in dataclasses.fields(cls.Config)}
    for key in list(cfg.space) + list(cfg.method_config):
        if key not in known:
            raise ConfigError(f"search: {key!r} is not a field of method {cfg.method}'s config; known: {sorted(known)}")
    both = sorted(set(cfg.space) & set(cfg.method_config))
    if both:
        raise ConfigError(f"search: {both} are both fixed (method_config) and searched (space)")
    unsearched = sorted(set(cfg.default) - set(cfg.space))
    if unsearched:
        raise ConfigError(f"search.default: {unsearched} are not searched fields (fixed ones go in method_config)")
    for key, param in cfg.space.items():
        check_param(param, f"search.space.{key}")
    check_space_corners(cfg)  # the method's value rules (and value types) at both ends of the space
    cls.make_config({**cfg.method_config, **sample_midpoint(cfg.space)})  # and inside it
    try:
        cls.make_config({**cfg.method_config, **cfg.default})
    except ValueError as e:
        raise ConfigError(f"search.default: {e}") from None
    return cfg


def check_space_corners(cfg: SearchConfig) -> None:
    """The method's own value rules (its config's `validate`) at the low and the high end of every
    searched field, so a bad space fails before the search, not in every trial."""
    cls = method_class(cfg.method)
    for end in ("low", "high"):
        point = {k: (p.values[0 if end == "low" else -1] if p.type == "choice" else getattr(p, end))
                 for k, p in cfg.space.items()}
        point = {k: int(v) if cfg.space[k].type == "int" else v for k, v in point.items()}
        try:
            cls.make_config({**cfg.method_config, **point})
        except ValueError as e:
            raise ConfigError(f"search.space ({end} end): {e}") from None


def check_param(p: SpaceParam, where: str) -> None:
    if p.type not in SPACE_TYPES:
        raise ConfigError(f"{where}.type: unknown space type {p.type!r}; known: {', '.join(SPACE_TYPES)}")
    if p.type == "choice":
        if not p.values:
            raise ConfigError(f"{where}.values: a choice needs a non-empty list of values")
        return
    if p.low is None or p.high is None:
        raise ConfigError(f"{where}: {p.type} needs `low` and `high`")
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        raise ConfigError(f"{where}: low and high must be finite")
    if p.low > p.high:
        raise ConfigError(f"{where}: low ({p.low}) > high ({p.high})")
    if p.type == "loguniform" and p.low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {p.low}")
    if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
        raise ConfigError(f"{where}: int bounds must be integers, got {p.low}, {p.high}")


def sample_midpoint(space: dict[str, SpaceParam]) -> dict[str, Any]:
    """A point inside the space (used to check value types before any trial runs)."""
    out = {}
    for key, p in space.items():
        if p.type == "choice":
            out[key] = p.values[0]
        elif p.type == "int":
            out[key] = int(p.low)
        elif p.type == "loguniform":
            out[key] = math.sqrt(p.low * p.high)
        else:
            out[key] = (p.low + p.high) / 2
    return out


def validation_images(cfg: SearchConfig) -> int:
    """Images per validation domain: `validation.num_images`, else the run's (`benchmark.num_images`)."""
    n = cfg.validation.num_images if cfg.validation.num_images is not None else cfg.benchmark.num_images
    if n is None:
        raise ConfigError("search.validation.num_images: give the images per domain of the run the setting is for "
                          "(or set search.benchmark.num_images)")
    return int(n)


def validation_data(cfg: SearchConfig, seed: int) -> HeldOutSet:
    """The validation domains of one stream seed and their provenance (clean training images, checked)."""
    dataset = cfg.validation.dataset or cfg.benchmark.name.removesuffix("_c")
    return validation_set(cfg.validation, validation_images(cfg), dataset, seed)


def validation_stream(cfg: SearchConfig, domains, seed: int):
    options = {"dirichlet_alpha": cfg.stream.dirichlet_alpha} if cfg.stream.setting == "label_shift" else {}
    return build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=seed, **options)


def objective_window(cfg: SearchConfig) -> int:
    return cfg.objective.window or validation_images(cfg)


# ---- one trial ------------------------------------------------------------------------------
def trial_method_config(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The full method config of a trial: defaults < fixed method_config < searched params."""
    values = {**cfg.method_config, **{k: plain(v) for k, v in params.items() if k in cfg.space}}
    return plain(dataclasses.asdict(method_class(cfg.method).make_config(values)))


def default_params(cfg: SearchConfig) -> dict[str, Any]:
    """The published default's values of the searched fields (the method's defaults under the
    search's fixed `method_config`, then `default`): the trial every search runs first."""
    full = trial_method_config(cfg, cfg.default)
    return {k: full[k] for k in cfg.space}


def in_space(cfg: SearchConfig, params: dict[str, Any]) -> bool:
    """Whether a point lies inside the search space (the searcher can be told its result)."""
    for key, p in cfg.space.items():
        value = params[key]
        if p.type == "choice":
            if value not in p.values:
                return False
        elif not (isinstance(value, (int, float)) and p.low <= value <= p.high):
            return False
    return True


def run_trial(
    cfg: SearchConfig,
    params: dict[str, Any],
    checkpoint: str | Path,
    report: Callable[[dict[str, float]], None] | None = None,
    validation: dict[int, HeldOutSet] | None = None,
) -> dict[str, Any]:
    """Run the method with `params` over the validation stream of every seed in
    `validation.seeds` (a fresh source model each; `validation`: the seeds' data where already
    built, {seed: HeldOutSet}, else built here); returns the final metrics:
    `objective`, `mean_error` and `worst_window` (means over seeds), the same per seed
    (`seed<s>/...`), `diverged` (0/1) and, for a diverged trial, `diverged_reason` (the
    objective is then `divergence.penalty`). `report` gets the running values every
    `report_every` batches (counted over all seeds), with the per-seed values of the seeds
    finished so far, and the final ones (`final: 1`).

    The method is built as an experiment row is (`build_row_method`: the context inputs it
    declares, EATA's Fisher batches or a plug-in's base's included) and run by the one
    evaluation loop (`evaluate`), watched through its `on_batch` (`DivergenceWatch`)."""
    device = resolve_device(cfg.device)
    seeds = cfg.validation.seeds
    held = validation if validation is not None else {}
    spec = MethodSpec(name=cfg.method, config=trial_method_config(cfg, params), adapter=cfg.adapter)
    window = objective_window(cfg)
    total = num_batches(cfg, held.get(seeds[0]) or validation_data(cfg, seeds[0]))
    per_seed = total // len(seeds)

    def due(batches: int) -> bool:
        return report is not None and batches % cfg.report_every == 0 and batches < total
    start = time.perf_counter()
    done = {"batches": 0, "images": 0, "wrong": 0.0}
    worst_windows: list[float] = []  # of the seeds finished

    def metrics(objective: float, mean_error: float, worst: float, final: bool) -> dict[str, Any]:
        return {"objective": float(objective), "mean_error": float(mean_error), "worst_window": float(worst),
                "batches": float(done["batches"]), "images": float(done["images"]), "final": float(final),
                "diverged": 0.0, "seconds": time.perf_counter() - start}

    def running(watch: DivergenceWatch) -> dict[str, Any]:
        """For ASHA: the error over every image so far, and the worst window finished so far."""
        mean = done["wrong"] / done["images"]
        worst = max(worst_windows + ([watch.worst_so_far] if watch.worst_so_far is not None else []), default=mean)
        # the seeds finished so far too: a trial ASHA stops keeps them in its record, comparable per seed
        finished = {k: v for k, v in out.items() if k.count("/") == 1}
        return {**metrics(combine(mean, worst, cfg.objective), mean, worst, False), **finished}

    out: dict[str, Any] = {}
    try:
        for seed in seeds:
            torch.manual_seed(seed)  # the seed orders the images and draws the method's randomness
            seed_cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, seed=seed))
            model = load_source_model(checkpoint, device=device)
            method = build_row_method(spec, model, seed_cfg, Path(checkpoint), device)
            watch = DivergenceWatch(cfg.divergence, window, method)

            def on_batch(progress: Progress, watch=watch) -> None:
                done["batches"] += 1
                done["images"] += progress.batch_images
                done["wrong"] += progress.batch_error * progress.batch_images
                watch(progress)
                if due(done["batches"]) and done["batches"] % per_seed:  # a seed's last batch reports below
                    report(running(watch))

            domains = (held.get(seed) or validation_data(cfg, seed)).domains
            stream = validation_stream(seed_cfg, domains, seed)
            result = evaluate(method, stream, method_name=cfg.method, device=device, progress=False, on_batch=on_batch)
            windows = watch.windows()
            watch.check_window(max(windows), done["batches"])  # the last, partial window too
            worst = max(windows)
            worst_windows.append(worst)
            out[f"seed{seed}/mean_error"] = result.mean_error
            out[f"seed{seed}/worst_window"] = worst
            out[f"seed{seed}/objective"] = combine(result.mean_error, worst, cfg.objective)
            out.update({f"seed{seed}/error/{d}": e for d, e in result.domain_errors.items()})
            out[f"seed{seed}/skipped_updates"] = float(result.skipped_updates)
            if due(done["batches"]):  # with this seed's values: ASHA's grace ends here (`grace_reports`)
                report(running(watch))
    except TrialDiverged as e:
        final = metrics(cfg.divergence.penalty, float("nan"), float("nan"), True)
        final.update({"diverged": 1.0, "diverged_reason": e.reason})
        if report is not None:
            report(final)
        return final
    final = metrics(
        float(np.mean([out[f"seed{s}/objective"] for s in seeds])),
        float(np.mean([out[f"seed{s}/mean_error"] for s in seeds])),
        float(np.mean([out[f"seed{s}/worst_window"] for s in seeds])), True)
    final.update(out)
    if report is not None:
        report(final)
    return final


def plain(value: Any) -> Any:
    """numpy scalars / tuples -> YAML- and JSON-friendly Python values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclasses.dataclass
class SearchOutcome:
    best_params: dict[str, Any]  # of the chosen setting: the searched winner, or the default
    best_config: dict[str, Any]
    best_error: float  # the chosen setting's validation value of the search's metric
    settings_path: Path
    trials: list[dict[str, Any]]  # the default first, then the searched: config, metrics, completed, diverged
    parent_run_id: str | None
    registered_version: str | None
    promoted: bool
    decision: dict[str, Any] = dataclasses.field(default_factory=dict)  # search_protocol.choose_setting


def write_settings(path: Path, config: dict[str, Any], method: str, error: float, chosen: str = "searched") -> Path:
    """The chosen setting as a YAML method config (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    what = "the published default (no searched setting beat it by more than the seed noise)" \
        if chosen == "default" else "the best searched setting"
    tmp.write_text(f"# {method}: {what} of a Ray Tune search; validation objective {error:.2f}\n"
                   + yaml.safe_dump(plain(config), sort_keys=False))
    tmp.replace(path)
    return path


def write_search_record(path: Path, decision: dict[str, Any], trials: list[dict[str, Any]],
                        config: dict[str, Any] | None = None) -> Path:
    """The search's record as JSON: the search config (`config`, what benchmarks/search_transfer.py
    re-runs the trials by), the decision, the validation rank correlation between the objective
    and the plain mean error over the trials that completed, and, per trial (the default first),
    its parameters, how it ended and its validation values (per seed too)."""
    keep = ("objective", "mean_error", "worst_window", "diverged_reason", "seconds")
    rows = [{"trial_id": t["trial_id"], "params": plain(t["config"]), "completed": t["completed"],
             "diverged": bool(t.get("diverged")), "error": t.get("error"),
             **{k: v for k, v in t["metrics"].items() if k in keep or (k.startswith("seed") and k.count("/") == 1)}}
            for t in trials]
    finished = [r for r in rows if r["completed"] and not r["diverged"] and "mean_error" in r]
    rho = spearman([r["objective"] for r in finished], [r["mean_error"] for r in finished])
    record = {"decision": decision, "trials": rows,
              "rank_correlation": {"objective_vs_mean_error": rho, "trials": len(finished)}}
    if config is not None:
        record = {"config": plain(config), **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def num_batches(cfg: SearchConfig, validation: HeldOutSet) -> int:
    """Batches a complete trial runs over all its seeds (every seed's stream has the same length)."""
    return len(validation_stream(cfg, validation.domains, cfg.validation.seeds[0])) * len(cfg.validation.seeds)


def num_reports(cfg: SearchConfig, validation: HeldOutSet) -> int:
    """Reports a complete trial makes over all its seeds (ASHA's max_t)."""
    return max(1, (num_batches(cfg, validation) - 1) // cfg.report_every + 1)


def grace_reports(cfg: SearchConfig, validation: HeldOutSet) -> int:
    """ASHA's grace period in reports: `asha.grace_period`, or (None) the reports that cover one
    seed's whole validation stream."""
    if cfg.asha.grace_period is not None:
        return cfg.asha.grace_period
    per_seed = num_batches(cfg, validation) // len(cfg.validation.seeds)
    return max(1, -(-per_seed // cfg.report_every))


def search_params(cfg: SearchConfig) -> dict[str, Any]:
    """The search config as MLflow run parameters (unset space bounds left out)."""
    data = dataclasses.asdict(cfg)
    data["space"] = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in data["space"].items()}
    return data


def absolute_paths(cfg: SearchConfig) -> None:
    """Trials run in their own directories: make every path in the config absolute."""
    if cfg.validation.root is not None:
        cfg.validation.root = str(Path(cfg.validation.root).resolve())
    if cfg.benchmark.root is not None:
        cfg.benchmark.root = str(Path(cfg.benchmark.root).resolve())
    if cfg.adapter is not None and not cfg.adapter.startswith("models:/"):
        cfg.adapter = str(Path(cfg.adapter).resolve())
