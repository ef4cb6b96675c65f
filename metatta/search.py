"""Hyperparameter searches of a TTA method, without the search engine: the search config and
its checks, one trial as a plain function, and the best setting's file.

A search (`SearchConfig`, one YAML file, e.g. configs/fmnist_c/tune_palm.yaml) names a method,
its fixed config and a search space over fields of the method's config. A trial (`run_trial`)
builds the method on a fresh copy of the source model as an experiment row is built
(`metatta.experiment.build_row_method`, so any method can be tuned: EATA with its Fisher
batches, a plug-in with its base's inputs) and runs the *held-out* corruption stream (anything
tuned sees the four held-out corruptions only; a benchmark corruption in the search's benchmark
section is refused) through the one evaluation loop (`metatta.evaluation.evaluate`), reporting
its running mean error every `report_every` batches; the last report is the trial's final mean
error (`final: 1`). `trainers.tune` runs trials with Ray Tune (Optuna + ASHA).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from metatta.config import ConfigError, build_dataclass
from metatta.data.benchmark_files import fashion_mnist_c
from metatta.data.domains import HELD_OUT_CORRUPTIONS
from metatta.data.streams import build_stream
from metatta.device import resolve_device
from metatta.evaluation import Progress, evaluate
from metatta.experiment import (BenchmarkConfig, MethodSpec, SourceConfig, StreamConfig, build_row_method,
                                load_domains)
from metatta.methods.base import method_class
from metatta.models import load_source_model


SPACE_TYPES = ("loguniform", "uniform", "int", "choice")


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
    check_space_corners(cfg)  # the method's value rules (and value types) at both ends of the space
    cls.make_config({**cfg.method_config, **sample_midpoint(cfg.space)})  # and inside it
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


# ---- one trial ------------------------------------------------------------------------------
def trial_method_config(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The full method config of a trial: defaults < fixed method_config < searched params."""
    values = {**cfg.method_config, **{k: plain(v) for k, v in params.items() if k in cfg.space}}
    return plain(dataclasses.asdict(method_class(cfg.method).make_config(values)))


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
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    best_error: float
    settings_path: Path
    trials: list[dict[str, Any]]  # one per trial: config, metrics, completed
    parent_run_id: str | None
    registered_version: str | None
    promoted: bool


def write_settings(path: Path, config: dict[str, Any], method: str, error: float) -> Path:
    """The best setting as a YAML method config (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# best {method} setting of a Ray Tune search; held-out mean error {error:.2f}%\n"
                   + yaml.safe_dump(plain(config), sort_keys=False))
    tmp.replace(path)
    return path


def num_reports(cfg: SearchConfig) -> int:
    """Reports a complete trial makes (ASHA's max_t)."""
    options = {"dirichlet_alpha": cfg.stream.dirichlet_alpha} if cfg.stream.setting == "label_shift" else {}
    n = len(build_stream(load_domains(cfg.benchmark), cfg.stream.setting, cfg.stream.batch_size,
                         seed=cfg.stream.seed, **options))
    return max(1, (n - 1) // cfg.report_every + 1)


def search_params(cfg: SearchConfig) -> dict[str, Any]:
    """The search config as MLflow run parameters (unset space bounds left out)."""
    data = dataclasses.asdict(cfg)
    data["space"] = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in data["space"].items()}
    return data


def absolute_paths(cfg: SearchConfig) -> None:
    """Trials run in their own directories: make every path in the config absolute."""
    if cfg.benchmark.root is None and cfg.benchmark.name == "fashion_mnist_c":
        cfg.benchmark.root = str(fashion_mnist_c(corruptions=cfg.benchmark.corruption_names()))
    if cfg.benchmark.root is not None:
        cfg.benchmark.root = str(Path(cfg.benchmark.root).resolve())
    if cfg.adapter is not None and not cfg.adapter.startswith("models:/"):
        cfg.adapter = str(Path(cfg.adapter).resolve())
