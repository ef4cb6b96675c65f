"""Evaluation workers: evaluate each newly registered adapter version exactly once.

A worker polls the MLflow registry for versions of one registered model. For a
version not yet evaluated it takes a claim, runs the evaluation experiment
(by default the 15 benchmark corruptions, reset per corruption) with that
version's MGG, logs the results to the version's own MLflow run (the training
run that registered it), and tags the version `evaluation=done`.

Claims come from one of two backends (`EvalWorker(claims=...)`):

- "file" (default, single host or a shared filesystem): files created with
  O_CREAT|O_EXCL in a directory beside the tracking store; creation is atomic,
  so when several workers see the same new version, exactly one evaluates it.
- "ray" (the hosts of one Ray cluster, no shared filesystem needed): a named,
  detached actor (`metatta_eval_claims` in namespace `metatta`) holds the claim
  ledger; its methods run one at a time, so each claim is granted once.

A worker that dies mid-evaluation leaves its claim behind; the version then
shows `evaluation=claimed` without `done`, and releasing the claim (removing
the claim file, or `RayClaims().release(model, version)`) re-queues it
(at-most-once rather than silently twice). The Ray ledger lives in the actor's
memory: it survives workers, not a restart of the cluster.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from metatta import tracking
from metatta.evaluation import Result, save_results
from metatta.experiment import ExperimentConfig, run_experiment, with_adapter

log = logging.getLogger(__name__)

STATUS_TAG = "evaluation"


CLAIMS_BACKENDS = ("file", "ray")
CLAIMS_ACTOR_NAME = "metatta_eval_claims"
CLAIMS_NAMESPACE = "metatta"


def default_claims_dir() -> Path:
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "eval_claims"
    from metatta.paths import cache_root

    return cache_root() / "eval_claims"


class Claims(Protocol):
    """Grants each (model, version) to one worker; what `EvalWorker` needs of a backend."""

    def claim(self, model: str, version: str, worker: str) -> bool: ...

    def complete(self, model: str, version: str, worker: str) -> None: ...

    def release(self, model: str, version: str, worker: str | None = None) -> bool: ...

    def list(self, model: str) -> dict[str, dict[str, Any]]: ...


class ClaimLedger:
    """The claim logic of the Ray backend, as a plain class (the actor wraps it unchanged).

    A claim is granted once per (model, version) until it is released; a
    completed claim stays, so a finished version is never granted again.
    """

    def __init__(self):
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}

    def claim(self, model: str, version: str, worker: str) -> bool:
        key = (model, str(version))
        if key in self._claims:
            return False
        self._claims[key] = {"worker": worker, "state": "claimed", "time": time.time()}
        return True

    def complete(self, model: str, version: str, worker: str) -> None:
        key = (model, str(version))
        entry = self._claims.setdefault(key, {"worker": worker, "state": "claimed", "time": time.time()})
        if entry["worker"] != worker:  # evaluated twice: a bug, or a release while it ran
            raise ValueError(f"{model} v{version}: claim is held by {entry['worker']}, not {worker}")
        entry.update(state="done", time=time.time())

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        """Drop a claim (re-queues the version); `worker` given: only if it holds it."""
        key = (model, str(version))
        entry = self._claims.get(key)
        if entry is None or (worker is not None and entry["worker"] != worker):
            return False
        del self._claims[key]
        return True

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        return {v: dict(e) for (m, v), e in sorted(self._claims.items(), key=lambda kv: int(kv[0][1])) if m == model}


class FileClaims:
    """Claims as O_CREAT|O_EXCL files under `<root>/<model>/v<version>` (one host, or a shared filesystem)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or default_claims_dir())

    def _path(self, model: str, version: str) -> Path:
        return self.root / model / f"v{version}"

    def claim(self, model: str, version: str, worker: str) -> bool:
        path = self._path(model, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{worker} {time.time():.0f}\n")
        return True

    def complete(self, model: str, version: str, worker: str) -> None:
        with open(self._path(model, version), "a") as f:
            f.write(f"{worker} {time.time():.0f} done\n")

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        path = self._path(model, version)
        if worker is not None and self._read(path).get("worker") != worker:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        first = lines[0].split() if lines else []
        return {"worker": first[0] if first else None, "time": float(first[1]) if len(first) > 1 else None,
                "state": "done" if any(line.endswith(" done") for line in lines[1:]) else "claimed"}

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        directory = self.root / model
        if not directory.is_dir():
            return {}
        paths = sorted((p for p in directory.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
        return {p.name[1:]: self._read(p) for p in paths}


class RayClaims:
    """Claims granted by a named, detached Ray actor, shared by every host of the cluster.

    Connects to the running cluster (`RAY_ADDRESS`, else the local `ray start`
    one) when Ray is not initialised yet; never starts a private one, which
    would grant claims to this process alone.
    """

    def __init__(self, name: str = CLAIMS_ACTOR_NAME, namespace: str = CLAIMS_NAMESPACE):
        import ray

        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or "auto"
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                from metatta.cli import UserError

                raise UserError(f"claims=ray needs a running Ray cluster (address {address!r}; start one with "
                                f"`ray start --head` or set RAY_ADDRESS): {e}") from e
        self._ray = ray
        actor_class = ray.remote(ClaimLedger)
        self.actor = actor_class.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                                         num_cpus=0, max_concurrency=1).remote()

    def claim(self, model: str, version: str, worker: str) -> bool:
        return self._ray.get(self.actor.claim.remote(model, str(version), worker))

    def complete(self, model: str, version: str, worker: str) -> None:
        self._ray.get(self.actor.complete.remote(model, str(version), worker))

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        return self._ray.get(self.actor.release.remote(model, str(version), worker))

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        return self._ray.get(self.actor.list.remote(model))


def make_claims(backend: str, claims_dir: Path | str | None = None) -> Claims:
    if backend == "file":
        return FileClaims(claims_dir)
    if backend == "ray":
        return RayClaims()
    raise ValueError(f"claims: unknown backend {backend!r}; known: {', '.join(CLAIMS_BACKENDS)}")


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

    def __post_init__(self):
        if isinstance(self.claims, str):
            self.claims = make_claims(self.claims, self.claims_dir)
        if isinstance(self.claims, FileClaims):
            self.claims_dir = self.claims.root / self.model_name
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
        return self.claims.claim(self.model_name, str(version), self.worker_id)

    def evaluate_version(self, version: str) -> list[Result]:
        c = tracking.client()
        mv = c.get_model_version(self.model_name, version)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, "claimed")
        c.set_model_version_tag(self.model_name, version, "evaluated_by", self.worker_id)
        adapter = f"models:/{self.model_name}/{version}"
        cfg = with_adapter(self.experiment, adapter)
        rows = adapter_rows(cfg, adapter)
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
        by_label = {r.method: r for r in results}
        row = next((label for label in rows if label in by_label), None)
        if row is None:
            raise ValueError(f"{self.model_name} v{version}: no result for the adapter's row(s) {rows}; "
                             f"got {sorted(by_label)}")
        mean = by_label[row].mean_error
        c.set_model_version_tag(self.model_name, version, "benchmark_mean_error", f"{mean:.4f}")
        c.set_model_version_tag(self.model_name, version, "benchmark_method", row)
        c.set_model_version_tag(self.model_name, version, STATUS_TAG, "done")
        log.info("%s v%s: benchmark mean error %.2f%% (worker %s)", self.model_name, version, mean, self.worker_id)
        return results

    def poll_once(self) -> list[str]:
        """Evaluate every version this worker manages to claim; returns them."""
        done = []
        for version in self.pending_versions():
            if self.claim(version):
                self.evaluate_version(version)
                self.claims.complete(self.model_name, version, self.worker_id)
                done.append(version)
        return done

    def run_forever(self, interval_s: float = 30.0, max_polls: int | None = None) -> None:
        polls = 0
        while max_polls is None or polls < max_polls:
            self.poll_once()
            polls += 1
            if max_polls is None or polls < max_polls:
                time.sleep(interval_s)
