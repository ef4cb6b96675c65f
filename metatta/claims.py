"""Claims with leases: each (model, version) is granted to one evaluation worker at a time.

A claim holds a lease: its holder renews it (a heartbeat) while it works, and a
claim whose last renewal is older than its lease is expired, so another worker
may take it over. A worker that dies therefore blocks its version for one
lease at most, instead of forever; a live worker never loses its claim as long
as it renews more often than its lease (`EvalWorker` renews every lease/4).

States: `claimed` (held, subject to its lease), `done` and `failed` (finished;
never granted again until released). Releasing a claim (`release`, or
`python launch/claims.py release`) re-queues the version.

Two backends, same semantics:

- `FileClaims` (one host, or a shared filesystem): one JSON file per claim,
  `<root>/<model>/v<version>`, created with O_CREAT|O_EXCL (exactly one of
  several racers creates it); the file's mtime is the last renewal. Takeover of
  an expired claim, renewal, completion and release run under an exclusive lock
  on `<root>/<model>/.lock`, so two workers never both take over one claim.
- `RayClaims` (the hosts of one Ray cluster): a named, detached actor
  (`metatta_eval_claims`, namespace `metatta`) wraps a `ClaimLedger`; its
  methods run one at a time, on one clock. The ledger lives in the actor's
  memory: it outlives workers, not a restart of the cluster.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Protocol

from metatta import tracking
from metatta.cli import UserError
from metatta.paths import cache_root

log = logging.getLogger(__name__)

BACKENDS = ("file", "ray")
ACTOR_NAME = "metatta_eval_claims"
NAMESPACE = "metatta"
DEFAULT_LEASE_S = 300.0
CLAIMED, DONE, FAILED = "claimed", "done", "failed"
FINISHED = (DONE, FAILED)


def default_claims_dir() -> Path:
    """Beside the tracking database for a local `sqlite:///` URI; otherwise (a tracking
    server) `<cache root>/eval_claims` on this host, which workers on other hosts do not see."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "eval_claims"
    return cache_root() / "eval_claims"


def check_lease(lease_s: float) -> float:
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not lease_s > 0 or math.isinf(lease_s):
        raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
    return float(lease_s)


def is_expired(entry: dict[str, Any], now: float | None = None) -> bool:
    """A held claim whose holder has not renewed it within its lease."""
    now = time.time() if now is None else now
    return entry.get("state") == CLAIMED and now - entry["heartbeat"] > entry["lease_s"]


class Claims(Protocol):
    """What `EvalWorker` needs of a claim backend."""

    def claim(self, model: str, version: str, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool: ...

    def renew(self, model: str, version: str, worker: str) -> bool: ...

    def complete(self, model: str, version: str, worker: str, state: str = DONE, reason: str = "") -> None: ...

    def release(self, model: str, version: str, worker: str | None = None) -> bool: ...

    def list(self, model: str) -> dict[str, dict[str, Any]]: ...


def _new_entry(worker: str, lease_s: float, now: float) -> dict[str, Any]:
    return {"worker": worker, "state": CLAIMED, "claimed_at": now, "heartbeat": now, "lease_s": check_lease(lease_s),
            "reason": ""}


def _check_finish_state(state: str) -> None:
    if state not in FINISHED:
        raise ValueError(f"claim state must be one of {', '.join(FINISHED)}, got {state!r}")


class ClaimLedger:
    """The claim logic of the Ray backend as a plain class (the actor wraps it unchanged)."""

    def __init__(self, clock=time.time):
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}
        self._clock = clock

    def claim(self, model: str, version: str, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        key, now = (model, str(version)), self._clock()
        entry = self._claims.get(key)
        if entry is not None and not is_expired(entry, now):
            return False
        if entry is not None:
            log.warning("%s v%s: claim of %s expired (no renewal for %.0f s); taken over by %s",
                        model, version, entry["worker"], now - entry["heartbeat"], worker)
        self._claims[key] = _new_entry(worker, lease_s, now)
        return True

    def renew(self, model: str, version: str, worker: str) -> bool:
        entry = self._claims.get((model, str(version)))
        if entry is None or entry["worker"] != worker or entry["state"] != CLAIMED:
            return False
        entry["heartbeat"] = self._clock()
        return True

    def complete(self, model: str, version: str, worker: str, state: str = DONE, reason: str = "") -> None:
        _check_finish_state(state)
        key = (model, str(version))
        entry = self._claims.get(key)
        if entry is None or entry["worker"] != worker:  # the lease ran out and another worker took it over
            holder = entry["worker"] if entry else "nobody"
            raise ValueError(f"{model} v{version}: claim is held by {holder}, not {worker}")
        entry.update(state=state, heartbeat=self._clock(), reason=reason)

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        """Drop a claim (re-queues the version); `worker` given: only if it holds it."""
        key = (model, str(version))
        entry = self._claims.get(key)
        if entry is None or (worker is not None and entry["worker"] != worker):
            return False
        del self._claims[key]
        return True

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {v: {**e, "expired": is_expired(e, now)}
                for (m, v), e in sorted(self._claims.items(), key=lambda kv: int(kv[0][1])) if m == model}


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on directory/.lock (Linux/macOS; on Windows takeovers are not serialised)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FileClaims:
    """Claims as JSON files `<root>/<model>/v<version>` (one host, or a shared filesystem)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or default_claims_dir())

    def _path(self, model: str, version: str) -> Path:
        return self.root / model / f"v{version}"

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """The claim in `path` (heartbeat: the file's mtime), None when there is none."""
        try:
            text, mtime = path.read_text(), path.stat().st_mtime
        except FileNotFoundError:
            return None
        if text.lstrip().startswith("{"):
            entry = json.loads(text)
        else:  # written by an older version: "<worker> <time>" lines, a last one ending in " done"
            lines = text.splitlines()
            first = lines[0].split() if lines else []
            entry = {"worker": first[0] if first else None, "claimed_at": float(first[1]) if len(first) > 1 else mtime,
                     "lease_s": DEFAULT_LEASE_S, "reason": "",
                     "state": DONE if any(line.endswith(" done") for line in lines[1:]) else CLAIMED}
        entry["heartbeat"] = mtime
        return entry

    @staticmethod
    def _private_name(path: Path) -> Path:
        return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    @staticmethod
    def _record(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if k not in ("heartbeat", "expired")}  # heartbeat: the mtime

    def _write(self, path: Path, entry: dict[str, Any]) -> None:
        """Replace the claim file atomically (a reader sees the old or the new claim, whole)."""
        tmp = self._private_name(path)
        try:
            tmp.write_text(json.dumps(self._record(entry)))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def claim(self, model: str, version: str, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        path = self._path(model, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = _new_entry(worker, lease_s, time.time())
        # Written whole under a private name, then hard-linked into place: link() fails when the
        # claim exists (atomic, also on NFS), and no reader ever sees a half-written claim.
        tmp = self._private_name(path)
        try:
            tmp.write_text(json.dumps(self._record(entry)))
            try:
                os.link(tmp, path)
            except FileExistsError:
                return self._take_over_if_expired(path, model, version, entry)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _take_over_if_expired(self, path: Path, model: str, version: str, entry: dict[str, Any]) -> bool:
        with _locked(path.parent):
            current = self._read(path)
            if current is None or not is_expired(current):
                return False  # released meanwhile: the next poll claims it afresh
            log.warning("%s v%s: claim of %s expired (no renewal for %.0f s); taken over by %s",
                        model, version, current["worker"], time.time() - current["heartbeat"], entry["worker"])
            self._write(path, entry)
            return True

    def renew(self, model: str, version: str, worker: str) -> bool:
        path = self._path(model, version)
        with _locked(path.parent):
            current = self._read(path)
            if current is None or current["worker"] != worker or current["state"] != CLAIMED:
                return False
            os.utime(path)
            return True

    def complete(self, model: str, version: str, worker: str, state: str = DONE, reason: str = "") -> None:
        _check_finish_state(state)
        path = self._path(model, version)
        with _locked(path.parent):
            current = self._read(path)
            if current is None or current["worker"] != worker:
                holder = current["worker"] if current else "nobody"
                raise ValueError(f"{model} v{version}: claim is held by {holder}, not {worker}")
            self._write(path, {**current, "state": state, "reason": reason})

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        path = self._path(model, version)
        with _locked(path.parent):
            current = self._read(path)
            if current is None or (worker is not None and current["worker"] != worker):
                return False
            path.unlink()
            return True

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        directory = self.root / model
        if not directory.is_dir():
            return {}
        now = time.time()
        listing = {}
        for p in sorted((p for p in directory.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:])):
            entry = self._read(p)
            if entry is not None:  # released between glob and read
                listing[p.name[1:]] = {**entry, "expired": is_expired(entry, now)}
        return listing


class RayClaims:
    """Claims granted by a named, detached Ray actor, shared by every host of the cluster.

    Connects to the running cluster (`RAY_ADDRESS`, else the local `ray start`
    one) when Ray is not initialised yet; never starts a private one, which
    would grant claims to this process alone.
    """

    def __init__(self, name: str = ACTOR_NAME, namespace: str = NAMESPACE):
        import ray

        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or "auto"
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                raise UserError(f"claims=ray needs a running Ray cluster (address {address!r}; start one with "
                                 f"`ray start --head` or set RAY_ADDRESS): {e}") from e
        self._ray = ray
        actor_class = ray.remote(ClaimLedger)
        self.actor = actor_class.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                                         num_cpus=0, max_concurrency=1).remote()

    def claim(self, model: str, version: str, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        return self._ray.get(self.actor.claim.remote(model, str(version), worker, check_lease(lease_s)))

    def renew(self, model: str, version: str, worker: str) -> bool:
        return self._ray.get(self.actor.renew.remote(model, str(version), worker))

    def complete(self, model: str, version: str, worker: str, state: str = DONE, reason: str = "") -> None:
        self._ray.get(self.actor.complete.remote(model, str(version), worker, state, reason))

    def release(self, model: str, version: str, worker: str | None = None) -> bool:
        return self._ray.get(self.actor.release.remote(model, str(version), worker))

    def list(self, model: str) -> dict[str, dict[str, Any]]:
        return self._ray.get(self.actor.list.remote(model))


def make_claims(backend: str, claims_dir: Path | str | None = None) -> Claims:
    if backend == "file":
        return FileClaims(claims_dir)
    if backend == "ray":
        return RayClaims()
    raise ValueError(f"claims: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


class Heartbeat:
    """Renews a claim every `interval_s` in a background thread while its `with` block runs.

    `lost` is set when a renewal is refused (the lease ran out and another worker took the
    claim over); the holder then learns it at `complete`, which refuses it too.
    """

    def __init__(self, claims: Claims, model: str, version: str, worker: str, interval_s: float):
        self.claims, self.model, self.version, self.worker = claims, model, str(version), worker
        self.interval_s = interval_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"claim-heartbeat-{model}-v{version}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                renewed = self.claims.renew(self.model, self.version, self.worker)
            except Exception as e:  # noqa: BLE001 - a store that is down for a moment: say so and retry
                log.warning("%s v%s: cannot renew the claim (%s: %s); retrying in %.0f s", self.model, self.version,
                            type(e).__name__, e, self.interval_s)
                continue
            if not renewed:
                log.warning("%s v%s: claim lost (lease expired and taken over, or released)", self.model, self.version)
                self.lost.set()
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
