"""Hyperparameter search of a TTA method with Ray Tune: the one place for searches.

The search config, one trial (`run_trial`, a plain function) and the settings file are in
`metatta.search`; this module runs the trials as Ray Tune trials, each reporting its running
mean error every `report_every` batches so ASHA stops bad trials early.

- Search algorithm: Optuna (TPE, seeded), limited to `max_concurrent` trials at
  once; scheduler: ASHA on `training_iteration` (one per report).
- Resources: `cpus_per_trial` CPUs and, where the cluster has GPUs and
  `device` is not cpu, `gpus_per_trial` (default 1) GPU per trial.
- MLflow: one parent run for the search, one child run per trial (tag
  `mlflow.parentRunId`), with the trial's parameters, its running error and its
  final error. A trial that completed marks its run FINISHED *before* its last
  `tune.report` (ASHA stops a trial at its last report, which would cut off
  anything after it); trials that ASHA stopped are closed as KILLED with
  `stopped_by=asha` by the driver, failed ones FAILED. The
  tracking URI (absolute SQLite, see metatta/tracking.py) is passed to the
  trials explicitly, since Tune changes each trial's working directory.
- Result: the best completed trial's full method config is written as YAML
  (`<output_dir>/<name>/best_<method>.yaml`, usable as a method's `config`
  or `settings`) and registered in MLflow as a model of plain files
  (settings.yaml + settings.json); the `champion` alias moves only when its
  held-out error beats the current champion's.

"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from metatta import tracking
from metatta.config import ConfigError
from metatta.models.checkpoint import checkpoint_hash
from metatta.search import (
    SearchConfig,
    SearchOutcome,
    SpaceParam,
    absolute_paths,
    num_reports,
    plain,
    run_trial,
    search_config,
    search_params,
    trial_method_config,
    write_settings,
)
from metatta.source import source_checkpoint
from trainers.cluster import cluster_gpus, connect
from trainers.tune_trials import named_trainable, progress_callback

log = logging.getLogger(__name__)

TRIAL_TAG = "tune_trial_id"


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
            client = tracking.client()
            run = client.create_run(experiment_id, run_name=f"{trial_cfg.name}-{trial_id}", tags={
                "mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, "kind": "tune-trial",
                "method": trial_cfg.method})
            run_id = run.info.run_id
            for key, value in params.items():
                client.log_param(run_id, key, json.dumps(plain(value)))

        def report(metrics: dict[str, float]) -> None:
            if client is not None:
                step = int(metrics["batches"])
                client.log_metric(run_id, "running_mean_error", metrics["mean_error"], step=step)
                if metrics.get("final"):
                    for key, value in metrics.items():
                        client.log_metric(run_id, key.replace("/", "_") if key != "mean_error" else key,
                                          value, step=step)
                    # Before tune.report: ASHA may stop the trial right at its last report.
                    client.set_terminated(run_id, "FINISHED")
            tune.report(dict(metrics))

        run_trial(trial_cfg, params, checkpoint, report=report)

    return named_trainable(trainable, cfg.method)


def run_search(cfg: SearchConfig) -> SearchOutcome:
    """Run the search on the Ray cluster this process is attached to (ray.init()
    first; a local instance is started when none is), then write and register the best setting."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    connect()
    checkpoint = str(source_checkpoint(cfg.source.checkpoint, cfg.source.config,
                                         ("search.source.checkpoint", "search.source.config")).resolve())
    absolute_paths(cfg)
    out = Path(cfg.output_dir).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    gpus = cfg.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster_gpus() >= 1 and cfg.device != "cpu" else 0.0
    max_reports = num_reports(cfg)

    parent_ctx = tracking.start_run(cfg.name, experiment=cfg.experiment, params=search_params(cfg),
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
            run_config=_run_config(cfg.name, out / "ray_results", [progress_callback(cfg)]),
        )
        log.info("search %s: %d trials of %s over %s (%d reports each, %s GPU per trial)", cfg.name,
                 cfg.num_samples, cfg.method, sorted(cfg.space), max_reports, gpus)
        grid = tuner.fit()
        trials = _collect(grid)
        if parent is not None:
            _close_stopped_runs(parent_id, experiment_id, trials, cfg)
        done = [t for t in trials if t["completed"]]
        if not done:
            errors = [str(r.error) for r in grid if r.error]
            raise RuntimeError(f"search {cfg.name}: no trial completed; errors: {errors[:3]}")
        sign = 1 if cfg.mode == "min" else -1
        best = min(done, key=lambda t: sign * t["metrics"]["mean_error"])
        best_params = {k: plain(v) for k, v in best["config"].items() if k in cfg.space}
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


def _run_config(name: str, storage: Path, callbacks: list):
    from ray import tune

    kwargs = dict(name=name, storage_path=str(storage), verbose=0, callbacks=callbacks)
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


def _close_stopped_runs(parent_id: str, experiment_id: str, trials, cfg: SearchConfig) -> None:
    """Child runs left RUNNING are closed: FINISHED where the trial completed (its own
    set_terminated was lost), FAILED where it raised, else KILLED with stopped_by=asha. A trial
    whose process died before it opened its run (#24.8) gets one, FAILED, with its error."""
    c = tracking.client()
    status = {t["trial_id"]: t for t in trials}
    with_runs = set()
    for run in c.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"):
        with_runs.add(run.data.tags.get(TRIAL_TAG, ""))
        if run.info.status != "RUNNING":
            continue
        trial = status.get(run.data.tags.get(TRIAL_TAG, ""))
        if trial is not None and trial["completed"]:
            c.set_terminated(run.info.run_id, "FINISHED")
            continue
        failed = trial is not None and trial["error"]
        c.set_tag(run.info.run_id, "stopped_by", "error" if failed else "asha")
        c.set_terminated(run.info.run_id, "FAILED" if failed else "KILLED")
    for number, trial in enumerate(trials):
        if trial["completed"] or (trial["trial_id"] and trial["trial_id"] in with_runs):
            continue
        trial_id = trial["trial_id"] or f"unnamed-{number}"
        run = c.create_run(experiment_id, run_name=f"{cfg.name}-{trial_id}", tags={
            "mlflow.parentRunId": parent_id, TRIAL_TAG: trial_id, "kind": "tune-trial", "method": cfg.method,
            "stopped_by": "error", "error": (trial["error"] or "ended without a result")[:5000]})
        for key, value in trial["config"].items():
            if key in cfg.space:
                c.log_param(run.info.run_id, key, json.dumps(plain(value)))
        c.set_terminated(run.info.run_id, "FAILED")
