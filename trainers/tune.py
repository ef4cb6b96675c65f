"""Hyperparameter search of a TTA method with Ray Tune: the one place for searches.

A search (`SearchConfig`, one YAML file, e.g. configs/fmnist_c/tune_palm.yaml)
names a method, its fixed config and a search space over fields of the
method's config. Every trial builds the method on a fresh copy of the source
model as an experiment row is built (`metatta.experiment.build_row_method`, so
any method can be tuned: EATA with its Fisher batches, a plug-in with its base's
inputs) and runs the *held-out* corruption stream (anything tuned sees the four
held-out corruptions only; a benchmark corruption in the search's benchmark
section is refused) through the one evaluation loop (`metatta.evaluation.evaluate`),
reporting its running mean error every `report_every` batches so ASHA stops bad
trials early; the last report is the trial's final mean error (`final: 1`).

- Search algorithm: Optuna (TPE, seeded), limited to `max_concurrent` trials at
  once; scheduler: ASHA on `training_iteration` (one per report).
- Resources: `cpus_per_trial` CPUs and, where the cluster has GPUs and
  `device` is not cpu, `gpus_per_trial` (default 1) GPU per trial.
- MLflow: one parent run for the search, one child run per trial (tag
  `mlflow.parentRunId`), with the trial's parameters, its running error and its
  final error; trials that ASHA stopped are closed as KILLED by the driver. The
  tracking URI (absolute SQLite, see metatta/tracking.py) is passed to the
  trials explicitly, since Tune changes each trial's working directory.
- Result: the best completed trial's full method config is written as YAML
  (`<output_dir>/<name>/best_<method>.yaml`, usable as a method's `config`
  or `settings`) and registered in MLflow as a model of plain files
  (settings.yaml + settings.json); the `champion` alias moves only when its
  held-out error beats the current champion's.

`run_trial(...)` is a plain function (no Ray), which tests call directly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from metatta.config import ConfigError, build_dataclass
from metatta.data.domains import HELD_OUT_CORRUPTIONS
from metatta.data.streams import build_stream
from metatta.device import resolve_device
from metatta.evaluation import Progress, evaluate
from metatta.experiment import (BenchmarkConfig, MethodSpec, SourceConfig, StreamConfig, build_row_method,
                                load_domains)
from metatta.methods.base import method_class
from metatta.models import load_source_model
from metatta.models.checkpoint import checkpoint_hash
from metatta.source import source_checkpoint
from trainers.cluster import cluster_gpus, connect

log = logging.getLogger(__name__)

SPACE_TYPES = ("loguniform", "uniform", "int", "choice")
TRIAL_TAG = "tune_trial_id"


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
    grace_period: int = 2  # reports (of `report_every` batches) before a trial may be stopped
    reduction_factor: int = 2


def _held_out_benchmark() -> BenchmarkConfig:
    return BenchmarkConfig(corruptions="held_out", num_images=500)


@dataclasses.dataclass
class SearchConfig:
    name: str = "tune"
    method: str = "tent"
    method_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # fixed fields
    space: dict[str, SpaceParam] = dataclasses.field(default_factory=dict)  # searched fields
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=_held_out_benchmark)
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    fisher_images: int = 500  # clean training images for methods that need source statistics (EATA)
    adapter: str | None = None  # a trained adapter, for methods that take one (mgtta, cta, ttt, optimizer: mgg)
    num_samples: int = 16
    max_concurrent: int = 2
    report_every: int = 1  # batches between reports to Tune (ASHA's time unit)
    asha: ASHAConfig = dataclasses.field(default_factory=ASHAConfig)
    metric: str = "mean_error"
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
    names = cfg.benchmark.corruption_names()
    leaked = [n for n in names if n not in HELD_OUT_CORRUPTIONS]
    if leaked:
        raise ConfigError(
            f"search.benchmark.corruptions: {leaked} are benchmark corruptions; a search tunes on the held-out "
            f"corruptions only ({', '.join(HELD_OUT_CORRUPTIONS)}), reported errors are on the others"
        )
    if cfg.mode not in ("min", "max"):
        raise ConfigError(f"search.mode: {cfg.mode!r} is not 'min' or 'max'")
    if cfg.metric != "mean_error":
        raise ConfigError(f"search.metric: only 'mean_error' is reported, got {cfg.metric!r}")
    for field in ("num_samples", "max_concurrent", "report_every"):
        if getattr(cfg, field) < 1:
            raise ConfigError(f"search.{field} must be >= 1, got {getattr(cfg, field)}")
    if cfg.asha.grace_period < 1 or cfg.asha.reduction_factor < 2:
        raise ConfigError("search.asha: grace_period must be >= 1 and reduction_factor >= 2")
    if not cfg.space:
        raise ConfigError("search.space is empty; give at least one field to search")
    known = {f.name for f in dataclasses.fields(cls.Config)}
    for key in list(cfg.space) + list(cfg.method_config):
        if key not in known:
            raise ConfigError(f"search: {key!r} is not a field of method {cfg.method}'s config; known: {sorted(known)}")
    both = sorted(set(cfg.space) & set(cfg.method_config))
    if both:
        raise ConfigError(f"search: {both} are both fixed (method_config) and searched (space)")
    for key, param in cfg.space.items():
        check_param(param, f"search.space.{key}")
    cls.make_config({**cfg.method_config, **sample_midpoint(cfg.space)})  # wrong value types fail here
    return cfg


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


def tune_space(space: dict[str, SpaceParam]) -> dict[str, Any]:
    """Our space -> Ray Tune search-space objects (which OptunaSearch converts)."""
    from ray import tune

    out = {}
    for key, p in space.items():
        if p.type == "loguniform":
            out[key] = tune.loguniform(p.low, p.high)
        elif p.type == "uniform":
            out[key] = tune.uniform(p.low, p.high)
        elif p.type == "int":
            out[key] = tune.randint(int(p.low), int(p.high) + 1)  # randint's upper bound is exclusive
        elif p.type == "choice":
            out[key] = tune.choice(list(p.values))
        else:  # checked in search_config
            raise ConfigError(f"search.space.{key}.type: unknown space type {p.type!r}")
    return out


# ---- one trial (plain function) ------------------------------------------------------------
def trial_method_config(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The full method config of a trial: defaults < fixed method_config < searched params."""
    values = {**cfg.method_config, **{k: _plain(v) for k, v in params.items() if k in cfg.space}}
    return _plain(dataclasses.asdict(method_class(cfg.method).make_config(values)))


def run_trial(
    cfg: SearchConfig,
    params: dict[str, Any],
    checkpoint: str | Path,
    report: Callable[[dict[str, float]], None] | None = None,
    domains=None,
) -> dict[str, float]:
    """Run the method with `params` over the held-out stream; returns the final
    metrics. `report` gets {'mean_error', 'batches', 'images', 'final'} every
    `report_every` batches and at the end (the running mean over domains seen so far).

    The method is built as an experiment row is (`build_row_method`: the context inputs it
    declares, EATA's Fisher batches or a plug-in's base's included) and run by the one
    evaluation loop (`evaluate`), watched through its `on_batch`."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    domains = domains if domains is not None else load_domains(cfg.benchmark)
    model = load_source_model(checkpoint, device=device)
    spec = MethodSpec(name=cfg.method, config=trial_method_config(cfg, params), adapter=cfg.adapter)
    method = build_row_method(spec, model, cfg, Path(checkpoint), device)
    options = {"dirichlet_alpha": cfg.stream.dirichlet_alpha} if cfg.stream.setting == "label_shift" else {}
    stream = build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=cfg.stream.seed, **options)
    start = time.perf_counter()

    def metrics(mean_error: float, batches: int, images: int, final: bool) -> dict[str, float]:
        return {"mean_error": mean_error, "batches": float(batches), "images": float(images),
                "final": float(final), "seconds": time.perf_counter() - start}

    def on_batch(progress: Progress) -> None:
        if report is not None and progress.batches % cfg.report_every == 0 \
                and progress.batches < progress.total_batches:
            report(metrics(progress.mean_error, progress.batches, progress.images, False))

    result = evaluate(method, stream, method_name=cfg.method, device=device, progress=False, on_batch=on_batch)
    out = metrics(result.mean_error, len(result.batch_domains), result.num_images, True)
    out.update({f"error/{d}": e for d, e in result.domain_errors.items()})
    if report is not None:
        report(out)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars / tuples -> YAML- and JSON-friendly Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- the Ray side ----------------------------------------------------------------------------
def make_trainable(cfg: SearchConfig, checkpoint: str, tracking_uri: str | None, parent_run_id: str | None,
                   experiment_id: str | None):
    """The function Tune runs per trial: run_trial + reports + a child MLflow run."""
    cfg_data = dataclasses.asdict(cfg)

    def trainable(params: dict[str, Any]) -> None:
        from ray import tune

        trial_cfg = search_config(copy.deepcopy(cfg_data))
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # absolute: trials run in their own directories
        context = tune.get_context()
        trial_id = context.get_trial_id() or "local"
        run_id, client = None, None
        if parent_run_id and experiment_id:
            from metatta import tracking

            client = tracking.client()
            run = client.create_run(experiment_id, run_name=f"{trial_cfg.name}-{trial_id}", tags={
                "mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, "kind": "tune-trial",
                "method": trial_cfg.method})
            run_id = run.info.run_id
            for key, value in params.items():
                client.log_param(run_id, key, json.dumps(_plain(value)))

        def report(metrics: dict[str, float]) -> None:
            if client is not None:
                step = int(metrics["batches"])
                client.log_metric(run_id, "running_mean_error", metrics["mean_error"], step=step)
                if metrics.get("final"):
                    for key, value in metrics.items():
                        client.log_metric(run_id, key.replace("/", "_") if key != "mean_error" else key,
                                          value, step=step)
            tune.report(dict(metrics))

        run_trial(trial_cfg, params, checkpoint, report=report)
        if client is not None:
            client.set_terminated(run_id, "FINISHED")

    return trainable


@dataclasses.dataclass
class SearchOutcome:
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    best_error: float
    settings_path: Path
    trials: list[dict[str, Any]]  # one per trial: config, metrics, completed
    parent_run_id: str | None
    registered_version: str | None
    promoted: bool


def run_search(cfg: SearchConfig) -> SearchOutcome:
    """Run the search on the Ray cluster this process is attached to (ray.init()
    first; a local instance is started when none is), then write and register the best setting."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from metatta import tracking

    connect()
    checkpoint = str(source_checkpoint(cfg.source.checkpoint, cfg.source.config,
                                         ("search.source.checkpoint", "search.source.config")).resolve())
    _absolute_paths(cfg)
    out = Path(cfg.output_dir).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    gpus = cfg.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster_gpus() >= 1 and cfg.device != "cpu" else 0.0
    max_reports = _num_reports(cfg)

    parent_ctx = tracking.start_run(cfg.name, experiment=cfg.experiment, params=_search_params(cfg),
                                    tags={"kind": "tune-search", "method": cfg.method}) if cfg.mlflow else contextlib.nullcontext()
    with parent_ctx as parent:
        parent_id = parent.info.run_id if parent is not None else None
        experiment_id = parent.info.experiment_id if parent is not None else None
        uri = tracking.tracking_uri() if cfg.mlflow else None
        trainable = tune.with_resources(make_trainable(cfg, checkpoint, uri, parent_id, experiment_id),
                                        {"cpu": cfg.cpus_per_trial, "gpu": gpus})
        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=cfg.max_concurrent)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_reports,
                                  grace_period=min(cfg.asha.grace_period, max_reports),
                                  reduction_factor=cfg.asha.reduction_factor) if cfg.asha.enabled else None
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(cfg.space),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.num_samples),
            run_config=_run_config(cfg.name, out / "ray_results"),
        )
        log.info("search %s: %d trials of %s over %s (%d reports each, %s GPU per trial)", cfg.name,
                 cfg.num_samples, cfg.method, sorted(cfg.space), max_reports, gpus)
        grid = tuner.fit()
        trials = _collect(grid)
        if parent is not None:
            _close_stopped_runs(parent_id, experiment_id, trials)
        done = [t for t in trials if t["completed"]]
        if not done:
            errors = [str(r.error) for r in grid if r.error]
            raise RuntimeError(f"search {cfg.name}: no trial completed; errors: {errors[:3]}")
        sign = 1 if cfg.mode == "min" else -1
        best = min(done, key=lambda t: sign * t["metrics"]["mean_error"])
        best_params = {k: _plain(v) for k, v in best["config"].items() if k in cfg.space}
        best_config = trial_method_config(cfg, best_params)
        best_error = float(best["metrics"]["mean_error"])
        log.info("best of %d trials (%d completed): %s -> held-out mean error %.2f%%", len(trials), len(done),
                 best_params, best_error)
        settings_path = write_settings(out / f"best_{cfg.method}.yaml", best_config, cfg.method, best_error)
        info = {"method": cfg.method, "held_out_error": best_error, "params": best_params, "config": best_config,
                "search": cfg.name, "trial_id": best["trial_id"], "source_checkpoint": checkpoint,
                "source_checkpoint_sha256": checkpoint_hash(checkpoint), "corruptions": cfg.benchmark.corruption_names(),
                "setting": cfg.stream.setting, "batch_size": cfg.stream.batch_size}
        version, promoted = None, False
        if parent is not None:
            tracking.log_metrics({"best_mean_error": best_error, "completed_trials": len(done),
                                  "trials": len(trials)})
            import mlflow

            mlflow.log_params({f"best.{k}": json.dumps(v) for k, v in best_params.items()})
            name = cfg.register_as if cfg.register_as is not None else f"{cfg.method}_settings"
            if name:
                directory = tracking.write_settings_dir(out / "settings", best_config, info)
                version = tracking.register_settings(name, directory, parent_id)
                promoted = tracking.promote_if_better(name, version, best_error)
    return SearchOutcome(best_params, best_config, best_error, settings_path, trials, parent_id, version, promoted)


def write_settings(path: Path, config: dict[str, Any], method: str, error: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# best {method} setting of a Ray Tune search; held-out mean error {error:.2f}%\n"
                   + yaml.safe_dump(_plain(config), sort_keys=False))
    tmp.replace(path)
    return path


def _num_reports(cfg: SearchConfig) -> int:
    """Reports a complete trial makes (ASHA's max_t)."""
    options = {"dirichlet_alpha": cfg.stream.dirichlet_alpha} if cfg.stream.setting == "label_shift" else {}
    n = len(build_stream(load_domains(cfg.benchmark), cfg.stream.setting, cfg.stream.batch_size,
                         seed=cfg.stream.seed, **options))
    return max(1, (n - 1) // cfg.report_every + 1)


def _run_config(name: str, storage: Path):
    from ray import tune

    kwargs = dict(name=name, storage_path=str(storage), verbose=0)
    run_config_cls = getattr(tune, "RunConfig", None)
    if run_config_cls is None:  # Ray < 2.40
        from ray.train import RunConfig as run_config_cls
    return run_config_cls(**kwargs)


def _collect(grid) -> list[dict[str, Any]]:
    trials = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trials.append({"trial_id": metrics.get("trial_id", ""), "config": dict(r.config or {}), "metrics": metrics,
                       "completed": bool(metrics.get("final")) and r.error is None,
                       "error": str(r.error) if r.error else None})
    return trials


def _close_stopped_runs(parent_id: str, experiment_id: str, trials) -> None:
    """Child runs of trials that ASHA stopped (or that failed) are left RUNNING: close them."""
    from metatta import tracking

    c = tracking.client()
    status = {t["trial_id"]: t for t in trials}
    for run in c.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        if run.info.status != "RUNNING":
            continue
        trial = status.get(run.data.tags.get(TRIAL_TAG, ""))
        failed = trial is not None and trial["error"]
        c.set_tag(run.info.run_id, "stopped_by", "error" if failed else "asha")
        c.set_terminated(run.info.run_id, "FAILED" if failed else "KILLED")


def _search_params(cfg: SearchConfig) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data["space"] = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in data["space"].items()}
    return data


def _absolute_paths(cfg: SearchConfig) -> None:
    """Trials run in their own directories: make every path in the config absolute."""
    if cfg.benchmark.root is None and cfg.benchmark.name == "fashion_mnist_c":
        from metatta.data.benchmark_files import fashion_mnist_c

        cfg.benchmark.root = str(fashion_mnist_c(corruptions=cfg.benchmark.corruption_names()))
    if cfg.benchmark.root is not None:
        cfg.benchmark.root = str(Path(cfg.benchmark.root).resolve())
    if cfg.adapter is not None and not cfg.adapter.startswith("models:/"):
        cfg.adapter = str(Path(cfg.adapter).resolve())
