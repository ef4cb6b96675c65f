"""Evaluation workers: evaluate each newly registered adapter version exactly once.

A worker polls the MLflow registry for versions of one registered model. For a
version not yet evaluated it takes a claim (`metatta.claims`: a file beside the
tracking store, or a detached Ray actor shared by a cluster's hosts), runs the
evaluation experiment (by default the 15 benchmark corruptions, reset per
corruption) with that version's adapter, logs the results to the version's own
MLflow run (the training run that registered it), and tags the version
`evaluation=done`.

A claim has a lease (`lease_s`, default 5 minutes) that the worker renews
every lease/4 while it evaluates: a worker that dies blocks its version for one
lease at most, then another worker takes it over. `python launch/claims.py
list|release` shows and releases claims.

A version whose evaluation fails (a truncated or foreign `weights.pt`, an
adapter for another source model, any error while evaluating it) is tagged
`evaluation=failed` with the reason in `evaluation_error`, its claim is marked
failed, and the worker goes on with the next version; releasing the claim
re-queues it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from metatta import tracking
from metatta.claims import DEFAULT_LEASE_S, DONE, FAILED, Claims, FileClaims, Heartbeat, check_lease, make_claims
from metatta.cli import error_message, is_user_error
from metatta.evaluation import Result, save_results
from metatta.experiment import ExperimentConfig, run_experiment, with_adapter

log = logging.getLogger(__name__)

STATUS_TAG = "evaluation"  # claimed | done | failed
ERROR_TAG = "evaluation_error"  # why a failed version failed
MAX_TAG_CHARS = 4000  # MLflow refuses tag values over 5000 characters


def adapter_rows(cfg: ExperimentConfig, adapter: str) -> list[str]:
    """Labels of the rows `with_adapter` pointed at `adapter`, in config order."""
    return [spec.label or spec.name for spec in cfg.methods if spec.adapter == adapter]


@dataclasses.dataclass
class EvalWorker:
    model_name: str
    experiment: ExperimentConfig
    claims_dir: Path | None = None  # file backend only
    worker_id: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    evaluate_fn: Callable[[ExperimentConfig], list[Result]] = run_experiment
    claims: str | Claims = "file"  # "file" | "ray" | a backend object
    lease_s: float = DEFAULT_LEASE_S  # a claim not renewed for this long may be taken over

    def __post_init__(self):
        check_lease(self.lease_s)
        if isinstance(self.claims, str):
            self.claims = make_claims(self.claims, self.claims_dir)
        if isinstance(self.claims, FileClaims):
            self.claims_dir = self.claims.root / self.model_name
            self.claims_dir.mkdir(parents=True, exist_ok=True)
        self._idle_logged = False
        self._shared_results: list[Result] | None = None  # the rows without the adapter, evaluated once

    def evaluate_rows(self, cfg: ExperimentConfig, adapter: str) -> list[Result]:
        """Every row of `cfg`, in config order: the rows that use `adapter` evaluated now; the others
        (Source, BN, Tent, ...: the same for every version) on this worker's first version only."""
        def label(spec):
            return spec.label or spec.name

        own = [spec for spec in cfg.methods if spec.adapter == adapter]
        shared = [spec for spec in cfg.methods if spec.adapter != adapter]
        if shared and self._shared_results is None:
            log.info("%s: evaluating the %d row(s) without the adapter once, for every version: %s",
                     self.model_name, len(shared), ", ".join(map(label, shared)))
            self._shared_results = self.evaluate_fn(dataclasses.replace(cfg, methods=shared))
        shared_labels = {label(spec) for spec in shared}
        by_label = {r.method: r for r in self._shared_results or [] if r.method in shared_labels}
        by_label.update({r.method: r for r in self.evaluate_fn(dataclasses.replace(cfg, methods=own))})
        rows = [label(spec) for spec in cfg.methods]
        return [by_label[row] for row in rows if row in by_label] + [r for row, r in by_label.items() if row not in rows]

    def pending_versions(self) -> list[str]:
        """Versions not yet evaluated (neither done nor failed), oldest first."""
        from mlflow.exceptions import MlflowException

        try:
            versions = tracking.client().search_model_versions(f"name='{self.model_name}'")
        except MlflowException as e:
            raise LookupError(f"cannot list versions of registered model {self.model_name!r}: {e}") from e
        todo = [v for v in versions if v.tags.get(STATUS_TAG) not in (DONE, FAILED)]
        return sorted((str(v.version) for v in todo), key=int)

    def claim(self, version: str) -> bool:
        return self.claims.claim(self.model_name, str(version), self.worker_id, self.lease_s)

    def evaluate_version(self, version: str) -> list[Result]:
        c = tracking.client()
        mv = c.get_model_version(self.model_name, version)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, "claimed")
        c.set_model_version_tag(self.model_name, version, "evaluated_by", self.worker_id)
        adapter = f"models:/{self.model_name}/{version}"
        cfg = with_adapter(self.experiment, adapter)
        rows = adapter_rows(cfg, adapter)
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}_{self.model_name}_v{version}", mlflow=False)
        results = self.evaluate_rows(cfg, adapter)
        out = Path(cfg.output_dir) / cfg.name / "results.json"
        save_results(results, out)
        if mv.run_id:
            for r in results:
                prefix = f"eval/{r.method}"
                c.log_metric(mv.run_id, f"{prefix}/mean_error", r.mean_error)
                for domain, error in r.domain_errors.items():
                    c.log_metric(mv.run_id, f"{prefix}/error/{domain}", error)
            c.log_artifact(mv.run_id, str(out), artifact_path=f"evaluation_v{version}")
        by_label = {r.method: r for r in results}
        row = next((label for label in rows if label in by_label), None)
        if row is None:
            raise ValueError(f"{self.model_name} v{version}: no result for the adapter's row(s) {rows}; "
                             f"got {sorted(by_label)}")
        mean = by_label[row].mean_error
        c.set_model_version_tag(self.model_name, version, "benchmark_mean_error", f"{mean:.4f}")
        c.set_model_version_tag(self.model_name, version, "benchmark_method", row)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, DONE)
        log.info("%s v%s: benchmark mean error %.2f%% (worker %s)", self.model_name, version, mean, self.worker_id)
        return results

    def mark_failed(self, version: str, exc: BaseException) -> str:
        """Tag the version failed with the reason (one line); returns the reason."""
        reason = f"{type(exc).__name__}: {error_message(exc)}"[:MAX_TAG_CHARS]
        c = tracking.client()
        c.set_model_version_tag(self.model_name, version, ERROR_TAG, reason)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, FAILED)
        return reason

    def _evaluate_claimed(self, version: str) -> str:
        """Evaluate a version this worker holds, renewing its claim meanwhile; returns done | failed."""
        with Heartbeat(self.claims, self.model_name, version, self.worker_id, interval_s=self.lease_s / 4):
            try:
                self.evaluate_version(version)
                state, reason = DONE, ""
            except Exception as exc:  # noqa: BLE001 - this version fails; the worker goes on with the next
                if is_user_error(exc):  # a bad artifact: its one-line reason says it all
                    log.error("error: %s v%s failed: %s", self.model_name, version, error_message(exc))
                else:  # a bug: keep its traceback in the worker's log
                    log.exception("%s v%s failed", self.model_name, version)
                reason = self.mark_failed(version, exc)
                state = FAILED
        try:
            self.claims.complete(self.model_name, version, self.worker_id, state, reason)
        except ValueError as e:  # our lease ran out mid-run and another worker took the version over
            log.warning("%s v%s: finished (%s) after losing the claim: %s", self.model_name, version, state, e)
        return state

    def poll_once(self) -> list[str]:
        """Evaluate every pending version this worker manages to claim; returns them (done or failed)."""
        handled = []
        pending = self.pending_versions()
        for version in pending:
            if not self.claim(version):
                continue
            self._idle_logged = False
            log.info("%s v%s: claimed by %s (lease %.0f s); evaluating", self.model_name, version, self.worker_id,
                     self.lease_s)
            self._evaluate_claimed(version)
            handled.append(version)
        if not handled and not self._idle_logged:
            busy = f"{len(pending)} pending, held by other workers" if pending else "none pending"
            log.info("%s: idle, no version to evaluate (%s)", self.model_name, busy)
            self._idle_logged = True
        return handled

    def run_forever(self, interval_s: float = 30.0, max_polls: int | None = None) -> None:
        log.info("worker %s watching registered model %r every %.0f s (claims: %s)", self.worker_id, self.model_name,
                 interval_s, type(self.claims).__name__)
        polls = 0
        while max_polls is None or polls < max_polls:
            self.poll_once()
            polls += 1
            if max_polls is None or polls < max_polls:
                time.sleep(interval_s)


def claim_status(model_name: str, claims: Claims) -> list[dict[str, Any]]:
    """One row per version (registered, or claimed): its registry status and its claim, oldest first."""
    versions = tracking.client().search_model_versions(f"name='{model_name}'")
    tags = {str(v.version): v.tags for v in versions}
    held = claims.list(model_name)
    now = time.time()
    rows = []
    for version in sorted(set(tags) | set(held), key=int):
        entry = held.get(version, {})
        rows.append({
            "version": version,
            "registry": tags.get(version, {}).get(STATUS_TAG, "pending") if version in tags else "(not registered)",
            "claim": ("expired" if entry.get("expired") else entry["state"]) if entry else "-",
            "worker": entry.get("worker") or "-",
            "renewed_s_ago": round(now - entry["heartbeat"]) if entry else None,
            "lease_s": entry.get("lease_s"),
            "error": tags.get(version, {}).get(ERROR_TAG, "") or entry.get("reason", ""),
        })
    return rows


def requeue(model_name: str, version: str, claims: Claims, redo: bool = False) -> str:
    """Release a version's claim and clear its claimed/failed status, so the next poll evaluates it;
    a version already done is left alone unless `redo`. Returns what was done, in words."""
    c = tracking.client()
    tags = c.get_model_version(model_name, version).tags
    status = tags.get(STATUS_TAG)
    if status == DONE and not redo:
        return f"v{version}: evaluated already (evaluation=done); left alone (pass --redo to evaluate it again)"
    released = claims.release(model_name, version)
    for tag in (STATUS_TAG, ERROR_TAG):
        if tag in tags:
            c.delete_model_version_tag(model_name, version, tag)
    was = f"{'claim released' if released else 'no claim'}, evaluation={status or 'pending'}"
    return f"v{version}: re-queued ({was})"
