"""Evaluation workers: evaluate each newly registered adapter version exactly once.

A worker polls the MLflow registry for versions of one registered model. For a
version not yet evaluated it takes a claim, runs the evaluation experiment
(by default the 15 benchmark corruptions, reset per corruption) with that
version's MGG, logs the results to the version's own MLflow run (the training
run that registered it), and tags the version `evaluation=done`.

Claims are files created with O_CREAT|O_EXCL in a directory beside the
tracking store: creation is atomic, so when several workers (processes or Ray
actors on hosts sharing that directory) see the same new version, exactly one
evaluates it. A worker that dies mid-evaluation leaves its claim behind; the
version then shows `evaluation=claimed` without `done`, and removing the claim
file re-queues it (at-most-once rather than silently twice).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from metatta import tracking
from metatta.evaluation import Result, save_results
from metatta.experiment import ExperimentConfig, run_experiment, with_adapter

log = logging.getLogger(__name__)

STATUS_TAG = "evaluation"


def default_claims_dir() -> Path:
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "eval_claims"
    return Path.home() / ".cache" / "metatta" / "eval_claims"


@dataclasses.dataclass
class EvalWorker:
    model_name: str
    experiment: ExperimentConfig
    claims_dir: Path | None = None
    worker_id: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    evaluate_fn: Callable[[ExperimentConfig], list[Result]] = run_experiment

    def __post_init__(self):
        self.claims_dir = Path(self.claims_dir or default_claims_dir()) / self.model_name
        self.claims_dir.mkdir(parents=True, exist_ok=True)

    def pending_versions(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            versions = tracking.client().search_model_versions(f"name='{self.model_name}'")
        except MlflowException as e:
            raise LookupError(f"cannot list versions of registered model {self.model_name!r}: {e}") from e
        todo = [v for v in versions if v.tags.get(STATUS_TAG) != "done"]
        return sorted((str(v.version) for v in todo), key=int)

    def claim(self, version: str) -> bool:
        try:
            fd = os.open(self.claims_dir / f"v{version}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.worker_id} {time.time():.0f}\n")
        return True

    def evaluate_version(self, version: str) -> list[Result]:
        c = tracking.client()
        mv = c.get_model_version(self.model_name, version)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, "claimed")
        c.set_model_version_tag(self.model_name, version, "evaluated_by", self.worker_id)
        cfg = with_adapter(self.experiment, f"models:/{self.model_name}/{version}")
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}_{self.model_name}_v{version}", mlflow=False)
        results = self.evaluate_fn(cfg)
        out = Path(cfg.output_dir) / cfg.name / "results.json"
        save_results(results, out)
        if mv.run_id:
            for r in results:
                prefix = f"eval/{r.method}"
                c.log_metric(mv.run_id, f"{prefix}/mean_error", r.mean_error)
                for domain, error in r.domain_errors.items():
                    c.log_metric(mv.run_id, f"{prefix}/error/{domain}", error)
            c.log_artifact(mv.run_id, str(out), artifact_path=f"evaluation_v{version}")
        mean = next((r.mean_error for r in results if "mgg" in r.method or r.method == "mgtta"), results[-1].mean_error)
        c.set_model_version_tag(self.model_name, version, "benchmark_mean_error", f"{mean:.4f}")
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, "done")
        log.info("%s v%s: benchmark mean error %.2f%% (worker %s)", self.model_name, version, mean, self.worker_id)
        return results

    def poll_once(self) -> list[str]:
        """Evaluate every version this worker manages to claim; returns them."""
        done = []
        for version in self.pending_versions():
            if self.claim(version):
                self.evaluate_version(version)
                done.append(version)
        return done

    def run_forever(self, interval_s: float = 30.0, max_polls: int | None = None) -> None:
        polls = 0
        while max_polls is None or polls < max_polls:
            self.poll_once()
            polls += 1
            if max_polls is None or polls < max_polls:
                time.sleep(interval_s)
