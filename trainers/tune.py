"""Hyperparameter search of a TTA method with Ray Tune: the one place for searches.

The search config, one trial (`run_trial`, a plain function), the validation protocol and the
default-or-searched rule are in `metatta.search` and `metatta.search_protocol`; this module runs
them on Ray (docs/searches.md).

- The published default runs first, as a Ray task with a trial's resources, on the same
  validation seeds as every trial; its per-seed objectives measure the seed noise. Optuna is told
  its result (when it lies inside the space) instead of running it again.
- Search algorithm: Optuna (TPE, seeded), limited to `max_concurrent` trials at once; scheduler:
  ASHA on `training_iteration` (one per report of the running objective).
- Resources: `cpus_per_trial` CPUs and, where the cluster has GPUs and `device` is not cpu,
  `gpus_per_trial` (default 1) GPU per trial.
- MLflow: one parent run for the search, one child run per trial and one for the default (tag
  `default=true`), with the parameters, the running objective and the final metrics; a diverged
  trial is tagged `diverged` with its reason. A trial that completed marks its run FINISHED
  *before* its last `tune.report` (ASHA stops a trial at its last report); trials that ASHA
  stopped are closed as KILLED with `stopped_by=asha` by the driver, failed ones FAILED. The
  tracking URI (absolute SQLite, see metatta/tracking.py) is passed to the trials explicitly.
- Result: `choose_setting` picks the best searched trial only if it beats the default by more
  than the seed noise, else the default; that setting's full method config is written as YAML
  (`<output_dir>/<name>/best_<method>.yaml`) and registered in MLflow (settings.yaml +
  settings.json, whose `decision` says `chosen: default | searched` with the numbers; version tag
  `chosen`); the `champion` alias moves only when its validation objective beats the champion's.
  Every trial, the default first, the decision and the search config: `<output_dir>/<name>/search.json`,
  also registered with the settings (benchmarks/search_transfer.py re-runs the trials on the benchmark).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from metatta import tracking
from metatta.config import ConfigError
from metatta.models.checkpoint import checkpoint_hash
from metatta.search import (SearchConfig, SearchOutcome, SpaceParam, absolute_paths, default_params, grace_reports,
                            in_space, num_reports, plain, run_trial, search_config, search_params, trial_method_config,
                            validation_data, write_search_record, write_settings)
from metatta.search_protocol import choose_setting, provenance_summary
from metatta.source import source_checkpoint
from trainers.cluster import cluster_gpus, connect
from trainers.tune_trials import TRIAL_TAG, close_stopped_runs, collect, named_trainable, progress_callback, run_config

log = logging.getLogger(__name__)

DEFAULT_TRIAL = "default"


def optuna_space(space: dict[str, SpaceParam]) -> dict[str, Any]:
    """Our space -> Optuna distributions (given to OptunaSearch directly, so that it can be told
    the default's result)."""
    from optuna import distributions as d

    out = {}
    for key, p in space.items():
        if p.type in ("loguniform", "uniform"):
            out[key] = d.FloatDistribution(p.low, p.high, log=p.type == "loguniform")
        elif p.type == "int":
            out[key] = d.IntDistribution(int(p.low), int(p.high))  # both ends inclusive
        elif p.type == "choice":
            out[key] = d.CategoricalDistribution(list(p.values))
        else:  # checked in search_config
            raise ConfigError(f"search.space.{key}.type: unknown space type {p.type!r}")
    return out


def logged_trial(cfg_data: dict[str, Any], params: dict[str, Any], checkpoint: str, trial_id: str,
                 tracking_uri: str | None, parent_run_id: str | None, experiment_id: str | None,
                 report_to: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One trial with its child MLflow run (parameters, running objective, final metrics, a
    `diverged` tag); `report_to` gets every report (Tune's `tune.report`). Returns the final metrics."""
    trial_cfg = search_config(copy.deepcopy(cfg_data))
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # absolute: trials run in their own directories
    run_id, client = None, None
    if parent_run_id and experiment_id:
        client = tracking.client()
        run = client.create_run(experiment_id, run_name=f"{trial_cfg.name}-{trial_id}", tags={
            "mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, "kind": "tune-trial",
            "method": trial_cfg.method, "default": str(trial_id == DEFAULT_TRIAL).lower()})
        run_id = run.info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, json.dumps(plain(value)))

    def report(metrics: dict[str, Any]) -> None:
        if client is not None:
            step = int(metrics["batches"])
            client.log_metric(run_id, "running_objective", metrics["objective"], step=step)
            if metrics.get("final"):
                for key, value in metrics.items():
                    if isinstance(value, float):
                        client.log_metric(run_id, tracking.metric_key(key.replace("/", "_")), value, step=step)
                if metrics.get("diverged"):
                    client.set_tag(run_id, "diverged", metrics["diverged_reason"])
                # Before tune.report: ASHA may stop the trial right at its last report.
                client.set_terminated(run_id, "FINISHED")
        if report_to is not None:
            report_to(dict(metrics))

    return run_trial(trial_cfg, params, checkpoint, report=report)


def make_trainable(cfg: SearchConfig, checkpoint: str, tracking_uri: str | None, parent_run_id: str | None,
                   experiment_id: str | None):
    """The function Tune runs per trial: `logged_trial`, reporting to Tune."""
    cfg_data = dataclasses.asdict(cfg)

    def trainable(params: dict[str, Any]) -> None:
        from ray import tune

        trial_id = tune.get_context().get_trial_id() or "local"
        logged_trial(cfg_data, params, checkpoint, trial_id, tracking_uri, parent_run_id, experiment_id,
                     report_to=tune.report)

    return named_trainable(trainable, cfg.method)


def default_trial(cfg_data: dict[str, Any], params: dict[str, Any], checkpoint: str, tracking_uri: str | None,
                  parent_run_id: str | None, experiment_id: str | None) -> tuple[dict[str, Any], list[float]]:
    """The default's `logged_trial`: its final metrics and its running value of the search metric
    at every report before the last (what ASHA would have seen of it, report by report)."""
    metric, running = cfg_data["metric"], []

    def keep(metrics: dict[str, Any]) -> None:
        if not metrics.get("final"):
            running.append(float(metrics[metric]))

    return logged_trial(cfg_data, params, checkpoint, DEFAULT_TRIAL, tracking_uri, parent_run_id, experiment_id,
                        report_to=keep), running


def seed_rungs(scheduler, running: list[float], mode: str) -> None:
    """Record the default in ASHA's rungs as if it were a trial: a rung promotes whatever reaches it
    first, so without it the first `max_concurrent` trials ran every seed however far behind the
    default they were (docs/searches.md). Ray's ASHA has no public way in; its rungs are pinned
    with Ray (constraints.txt) and tested (tests/test_tune.py)."""
    sign = -1.0 if mode == "min" else 1.0  # ASHA records rewards: higher is better
    for bracket in scheduler._brackets:
        for milestone, recorded in bracket._rungs:
            if milestone <= len(running):
                recorded[DEFAULT_TRIAL] = sign * running[milestone - 1]


def run_default(cfg: SearchConfig, checkpoint: str, resources: dict[str, float], tracking_uri: str | None,
                parent_run_id: str | None, experiment_id: str | None) -> dict[str, Any]:
    """The published default's trial, run first as a Ray task with a trial's resources."""
    ray = connect()
    params = default_params(cfg)
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(default_trial)
    metrics, running = ray.get(task.remote(dataclasses.asdict(cfg), params, checkpoint, tracking_uri,
                                           parent_run_id, experiment_id))
    log.info("search %s: the default %s -> %s", cfg.name, params,
             f"diverged ({metrics['diverged_reason']})" if metrics["diverged"] else
             f"objective {metrics['objective']:.2f} (" + ", ".join(
                 f"{k.split('/')[0]} {v:.2f}" for k, v in metrics.items() if k.endswith("/objective")) + ")")
    return {"trial_id": DEFAULT_TRIAL, "config": params, "metrics": metrics, "completed": True,
            "diverged": bool(metrics["diverged"]), "error": None, "running": running}


def run_search(cfg: SearchConfig) -> SearchOutcome:
    """Run the default, then the search, on the Ray cluster this process is attached to (ray.init()
    first; a local instance is started when none is); write and register the chosen setting."""
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
    resources = {"cpu": cfg.cpus_per_trial, "gpu": gpus}
    # built here for its provenance and length, then dropped; trials rebuild it (seeded, a second or so per seed)
    provenance = {}
    for seed in cfg.validation.seeds:
        held = validation_data(cfg, seed)
        provenance[f"seed{seed}"] = held.provenance
    (out / "validation_provenance.json").write_text(json.dumps(provenance))
    max_reports, images_per_domain, grace = num_reports(cfg, held), len(held.domains[0]), grace_reports(cfg, held)
    del held

    parent_ctx = tracking.start_run(cfg.name, experiment=cfg.experiment, params=search_params(cfg),
                                    tags={"kind": "tune-search", "method": cfg.method}) if cfg.mlflow else contextlib.nullcontext()
    with parent_ctx as parent:
        parent_id = parent.info.run_id if parent is not None else None
        experiment_id = parent.info.experiment_id if parent is not None else None
        uri = tracking.tracking_uri() if cfg.mlflow else None
        default = run_default(cfg, checkpoint, resources, uri, parent_id, experiment_id)
        warm = in_space(cfg, default["config"])  # Optuna can only be told a point of its space
        searcher = ConcurrencyLimiter(OptunaSearch(
            space=optuna_space(cfg.space), metric=cfg.metric, mode=cfg.mode, seed=cfg.seed,
            points_to_evaluate=[default["config"]] if warm else None,
            evaluated_rewards=[default["metrics"][cfg.metric]] if warm else None), max_concurrent=cfg.max_concurrent)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.metric, mode=cfg.mode, max_t=max_reports,
                                  grace_period=min(grace, max_reports),
                                  reduction_factor=cfg.asha.reduction_factor) if cfg.asha.enabled else None
        if scheduler is not None and not default["diverged"]:
            seed_rungs(scheduler, default["running"], cfg.mode)
        tuner = tune.Tuner(
            tune.with_resources(make_trainable(cfg, checkpoint, uri, parent_id, experiment_id), resources),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.num_samples),
            run_config=run_config(cfg.name, out / "ray_results", [progress_callback(cfg)]),
        )
        log.info("search %s: the default and %d trials of %s over %s on %d seeds (%d reports each, %s GPU per "
                 "trial)", cfg.name, cfg.num_samples, cfg.method, sorted(cfg.space), len(cfg.validation.seeds),
                 max_reports, gpus)
        grid = tuner.fit()
        searched = collect(grid)
        if parent is not None:
            close_stopped_runs(parent_id, experiment_id, searched, cfg)
        trials = [default] + searched
        decision = choose_setting(default, searched, cfg.acceptance, cfg.metric)
        chosen = next(t for t in trials if t["trial_id"] == decision["trial_id"])
        best_params = {k: plain(v) for k, v in chosen["config"].items() if k in cfg.space}
        best_config = trial_method_config(cfg, best_params)
        best_error = float(chosen["metrics"][cfg.metric])
        log.info("search %s: chose the %s setting %s (%s) -> validation %s %.2f", cfg.name, decision["chosen"],
                 best_params, decision["why"], cfg.metric, best_error)
        settings_path = write_settings(out / f"best_{cfg.method}.yaml", best_config, cfg.method, best_error,
                                       decision["chosen"])
        # the resolved checkpoint, so that the trials can be re-run on the same source model
        recorded = {**search_params(cfg), "source": {"checkpoint": checkpoint, "config": None}}
        record = write_search_record(out / "search.json", decision, trials, recorded)
        info = {"method": cfg.method, "validation_" + cfg.metric: best_error, "params": best_params,
                "config": best_config, "chosen": decision["chosen"], "decision": decision, "search": cfg.name,
                "trial_id": chosen["trial_id"], "source_checkpoint": checkpoint,
                "source_checkpoint_sha256": checkpoint_hash(checkpoint),
                "validation": {seed: provenance_summary(p) for seed, p in provenance.items()},
                "setting": cfg.stream.setting, "batch_size": cfg.stream.batch_size, "images_per_domain": images_per_domain}
        version, promoted = None, False
        if parent is not None:
            tracking.log_metrics({"best_" + cfg.metric: best_error, "trials": len(trials),
                                  "completed_trials": sum(t["completed"] for t in trials),
                                  "diverged_trials": decision["diverged_trials"], "seed_noise": decision["seed_noise"],
                                  "margin": decision["margin"], "default_" + cfg.metric: default["metrics"][cfg.metric]})
            import mlflow

            mlflow.set_tag("chosen", decision["chosen"])
            mlflow.log_params({f"best.{k}": json.dumps(v) for k, v in best_params.items()})
            name = cfg.register_as if cfg.register_as is not None else f"{cfg.method}_settings"
            if name:
                directory = tracking.write_settings_dir(out / "settings", best_config, info)
                shutil.copyfile(record, directory / record.name)  # the trials travel with the registered setting
                version = tracking.register_settings(name, directory, parent_id, tags={"chosen": decision["chosen"]})
                promoted = tracking.promote_if_better(name, version, best_error)
    return SearchOutcome(best_params, best_config, best_error, settings_path, trials, parent_id, version, promoted,
                         decision)
