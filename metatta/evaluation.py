"""Run a TTA method over a test stream and measure it.

`evaluate(method, stream)` returns a `Result`: error per domain, mean error,
expected calibration error, images per second, peak memory, the error over the
stream (for continual plots) and the full protocol that produced the numbers.
Results are plain JSON; tables and plots are made from them (reporting.py).

It is the one evaluation loop (reset at domain changes, adapt, count): experiments,
Ray Tune trials and evaluation workers all run it. A caller that needs to watch the
stream as it goes (a Tune trial reporting its running error so ASHA can stop it)
passes `on_batch`, called with a `Progress` after every batch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from metatta.data.types import Batch
from metatta.versions import library_versions  # noqa: F401  (re-exported; used in the protocol)

log = logging.getLogger(__name__)

ECE_BINS = 15


class Stream(Protocol):
    setting: str
    resets_per_domain: bool

    def __iter__(self): ...
    def __len__(self) -> int: ...


@dataclasses.dataclass
class Result:
    method: str
    domain_errors: dict[str, float]  # percent, in stream order
    mean_error: float  # percent, mean over domains
    ece: float  # percent, over all images
    images_per_second: float
    peak_memory_mb: float
    num_images: int
    adapted_parameters: int
    error_over_stream: list[float]  # percent, per batch, in stream order
    batch_domains: list[str]
    protocol: dict[str, Any]
    skipped_updates: int = 0  # updates the non-finite guard refused (methods/base.py)
    collapse_events: int = 0  # times the method's collapse guard fired (methods/guard.py)
    scheduled_resets: int = 0  # resets by the method's `reset_every` schedule (RDumb)
    # mean over a domain's batches of the parameters the method adapted on each batch
    # (constant for most methods; PALM's layer selection changes it batch by batch)
    domain_adapted_parameters: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise ValueError(f"result is missing field(s) {sorted(missing)}")
        return cls(**{k: data[k] for k in fields if k in data})


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where an evaluation stands after a batch (what `evaluate`'s `on_batch` is given)."""

    batches: int  # batches evaluated so far
    total_batches: int  # batches in the stream
    images: int  # images evaluated so far
    domain: str  # the domain of the batch just evaluated
    domain_errors: dict[str, float]  # percent, per domain seen so far, in stream order
    batch_error: float = float("nan")  # percent, of the batch just evaluated
    batch_images: int = 0  # images in the batch just evaluated
    finite_logits: bool = True  # whether every logit of that batch was finite

    @property
    def mean_error(self) -> float:
        """Mean over the domains seen so far (the final one is `Result.mean_error`)."""
        return float(np.mean(list(self.domain_errors.values())))


def save_results(results: Iterable[Result], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    tmp.replace(path)  # atomic: an interrupted write never replaces a good file
    return path


def load_results(path: str | Path) -> list[Result]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return [Result.from_dict(d) for d in data]


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins, in percent."""
    if len(confidences) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidences[mask].mean())
    return 100.0 * float(ece)


class _PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU, else the peak of the
    process's resident set sampled by a thread (a CPU has no allocator counter)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_bytes = self._peak - self._base
        return False


def evaluate(
    method: torch.nn.Module,
    stream: Stream,
    *,
    method_name: str | None = None,
    device: str | torch.device = "cpu",
    protocol: dict[str, Any] | None = None,
    progress: bool = True,
    on_batch: Callable[[Progress], None] | None = None,
) -> Result:
    """Run `method` over `stream`, adapting online, and measure it.

    Resets the method at every domain change when the stream says so (episodic).
    `on_batch(progress)` runs after every batch, outside the timed part."""
    device = torch.device(device)
    name = method_name or getattr(method, "name", type(method).__name__)
    errors_by_domain: "OrderedDict[str, list[int]]" = OrderedDict()
    adapted_by_domain: dict[str, list[int]] = {}
    error_over_stream: list[float] = []
    batch_domains: list[str] = []
    confidences, corrects = [], []
    num_images = 0
    elapsed = 0.0
    previous_domain = None
    with _PeakMemory(device) as memory:
        for batch in tqdm(stream, total=len(stream), desc=f"{name}", disable=not progress, leave=False):
            x, y, domain = batch if isinstance(batch, Batch) else Batch(*batch)
            if stream.resets_per_domain and previous_domain is not None and domain != previous_domain:
                method.reset()
            previous_domain = domain
            x, y = x.to(device, non_blocking=True), y.to(device)
            start = time.perf_counter()
            logits = method(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            adapted_by_domain.setdefault(domain, []).append(_adapted_parameters(method))
            finite = bool(torch.isfinite(logits).all())
            if not finite:
                log.warning("%s produced non-finite logits on %s; counted as errors", name, domain)
            probs = torch.nan_to_num(logits.float(), nan=0.0).softmax(1)
            conf, pred = probs.max(1)
            correct = (pred == y).cpu().numpy()
            errors_by_domain.setdefault(domain, [0, 0])
            errors_by_domain[domain][0] += int((~correct.astype(bool)).sum())
            errors_by_domain[domain][1] += len(correct)
            error_over_stream.append(100.0 * (1.0 - correct.mean()))
            batch_domains.append(domain)
            confidences.append(conf.cpu().numpy())
            corrects.append(correct)
            num_images += len(correct)
            if on_batch is not None:
                on_batch(Progress(batches=len(batch_domains), total_batches=len(stream), images=num_images,
                                  domain=domain, domain_errors=_percent(errors_by_domain),
                                  batch_error=error_over_stream[-1], batch_images=len(correct), finite_logits=finite))
    if num_images == 0:
        raise ValueError("the stream yielded no images")
    domain_errors = _percent(errors_by_domain)
    return Result(
        method=name,
        domain_errors=domain_errors,
        mean_error=float(np.mean(list(domain_errors.values()))),
        ece=expected_calibration_error(np.concatenate(confidences), np.concatenate(corrects).astype(float)),
        images_per_second=num_images / elapsed if elapsed > 0 else float("inf"),
        peak_memory_mb=memory.peak_bytes / 2**20,
        num_images=num_images,
        adapted_parameters=_adapted_parameters(method),
        skipped_updates=int(getattr(method, "skipped_updates", 0)),
        collapse_events=int(getattr(method, "collapse_events", 0)),
        scheduled_resets=int(getattr(method, "scheduled_resets", 0)),
        domain_adapted_parameters={d: float(np.mean(c)) for d, c in adapted_by_domain.items()},
        error_over_stream=error_over_stream,
        batch_domains=batch_domains,
        protocol={**(protocol or {}), "setting": stream.setting, "device": str(device),
                  "library_versions": library_versions()},
    )


def _percent(errors_by_domain: dict[str, list[int]]) -> dict[str, float]:
    """{domain: [wrong, total]} -> {domain: error in percent}."""
    return {d: 100.0 * wrong / total for d, (wrong, total) in errors_by_domain.items()}


def _adapted_parameters(method: torch.nn.Module) -> int:
    count = getattr(method, "adapted_parameter_count", None)
    return int(count()) if callable(count) else 0
