"""How Tune's trials look from outside: a trainable class named after the method (the dashboard
and the job log show `<method> trial <id> <params>`, not `ImplicitFunc`), a callback that
logs one line per trial that ends (the job log is otherwise silent while Tune runs at verbose=0),
and the trials' records after the search (`collect`; MLflow runs left open closed)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from metatta import tracking
from metatta.search import SearchConfig, plain

log = logging.getLogger("trainers.tune")  # the search's own logger: one place to read the job log

TRIAL_TAG = "tune_trial_id"


def named_trainable(trainable, method: str):
    """A trainable class named after the method (`TentTrial`, not Tune's anonymous
    `ImplicitFunc`) whose actors show as `<method> trial <id> <params>` in the Ray dashboard
    (Ray takes an actor's dashboard name from its `__repr__`)."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(trainable)

    def describe(self) -> str:
        params = " ".join(f"{k}={short_value(v)}" for k, v in sorted((self.config or {}).items()))
        return f"{method} trial {self.trial_id} {params}".strip()

    class_name = "".join(part.capitalize() for part in method.split("_")) + "Trial"
    return type(class_name, (base,), {"__repr__": describe, "_name": class_name})


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def progress_callback(cfg: SearchConfig):
    """A Tune callback that logs one line per trial that ends (the job log is otherwise silent
    while `verbose=0`), with its id, parameters, how it ended and its error."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.ended = 0

        def _line(self, trial, how: str, result: dict | None) -> None:
            self.ended += 1
            params = {k: short_value(v) for k, v in (trial.config or {}).items() if k in cfg.space}
            if result and result.get("diverged"):
                error = f"diverged ({result.get('diverged_reason', '')})"
            elif result and "mean_error" in result:
                error = f"objective {result['objective']:.2f}, mean error {result['mean_error']:.2f}%"
            else:
                error = "no result"
            log.info("search %s: trial %s %s (%d/%d ended) %s -> %s", cfg.name, trial.trial_id, how, self.ended,
                     cfg.num_samples, params, error)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            self._line(trial, "completed" if result.get("final") else "stopped by ASHA", result)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "failed", trial.last_result)

    return TrialProgress()


def run_config(name: str, storage: Path, callbacks: list):
    from ray import tune

    kwargs = dict(name=name, storage_path=str(storage), verbose=0, callbacks=callbacks)
    run_config_cls = getattr(tune, "RunConfig", None)
    if run_config_cls is None:  # Ray < 2.40
        from ray.train import RunConfig as run_config_cls
    return run_config_cls(**kwargs)


def collect(grid) -> list[dict[str, Any]]:
    trials = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trials.append({"trial_id": metrics.get("trial_id", ""), "config": dict(r.config or {}), "metrics": metrics,
                       "completed": bool(metrics.get("final")) and r.error is None,
                       "diverged": bool(metrics.get("diverged")), "error": str(r.error) if r.error else None})
    return trials


def close_stopped_runs(parent_id: str, experiment_id: str, trials, cfg: SearchConfig) -> None:
    """Child runs left RUNNING are closed: FINISHED where the trial completed (its own
    set_terminated was lost), FAILED where it raised, else KILLED with stopped_by=asha. A trial
    whose process died before it opened its run gets one, FAILED, with its error."""
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
