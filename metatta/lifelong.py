"""Windowed evaluation over long streams, written incrementally, resumable after a kill.

`evaluate_windowed(method, stream, path, window=10_000)` runs `method` over `stream` in windows
of `window` images (a multiple of the batch size) and appends one JSON line per finished window
to `path` (error, ECE, images/s, ...). After each window the method's state (module state dict,
optimizer state, extra state, torch RNG) is saved beside it, so a run that is killed resumes at
the first unfinished window with the state it had there: finished windows are never redone, and
the final windows are those of an uninterrupted run (for a method that is deterministic given
its state).

Crash safety: window w's state goes to `<path>.state-<w>.pt` (written to a temporary name and
renamed) *before* its line is appended; the state of window w - 1 is deleted only after that.
So for n complete lines the state of window n - 1 always exists; a torn last line is dropped.

`summarize({method: window errors})` gives the summary table of a lifelong benchmark: mean error,
worst window, and the number of windows in which a method's error is above BN's and above
Source's.

Built on `metatta.evaluation.evaluate`, called once per window on a view of the stream's
batches (the method keeps adapting across calls). With an `on_batch` hook and a start batch in
`evaluate`, one call could do the whole stream; see docs/lifelong.md.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from metatta.data.types import Batch
from metatta.evaluation import evaluate
from metatta.methods.guard import agreement, marginal_entropy, relative_marginal_entropy
from metatta.reporting import markdown_table

FORMAT = "metatta.lifelong.v1"


def _batches_from(stream, first: int) -> Iterator[Batch]:
    """The stream's batches from batch `first` on: directly where the stream has random access
    (`batch(i)`, the ccc stream), else by iterating past the first ones once."""
    if hasattr(stream, "batch"):
        return (stream.batch(i) for i in range(first, len(stream)))
    return itertools.islice(iter(stream), first, None)


class _WindowView:
    """The next `count` batches of a shared batch iterator, as a stream `evaluate` accepts;
    records the batch sizes."""

    def __init__(self, stream, batches: Iterator[Batch], count: int):
        self.batches, self.count = batches, count
        self.setting = stream.setting
        self.resets_per_domain = False
        self.sizes: list[int] = []

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        for batch in itertools.islice(self.batches, self.count):
            self.sizes.append(len(batch.y))
            yield batch


# ---- method state ----------------------------------------------------------------------------------
def method_state(method: torch.nn.Module) -> dict[str, Any]:
    optimizer = getattr(method, "optimizer", None)
    extra = getattr(method, "extra_state", None)
    schedule = getattr(method, "schedule_state", None)
    return {"module": method.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "extra": extra() if callable(extra) else {}, "torch_rng": torch.get_rng_state(),
            "schedule": schedule() if callable(schedule) else None}


def load_method_state(method: torch.nn.Module, state: dict[str, Any]) -> None:
    method.load_state_dict(state["module"])
    optimizer = getattr(method, "optimizer", None)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state["extra"]:
        method.load_extra_state(state["extra"])
    if state.get("schedule") is not None:
        method.load_schedule_state(state["schedule"])
    torch.set_rng_state(state["torch_rng"])


def _state_path(path: Path, window: int) -> Path:
    return path.with_name(f"{path.name}.state-{window}.pt")


# ---- the results file --------------------------------------------------------------------------------
def read_windows(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, window records) of a results file; a torn last line (a kill mid-write) is left out."""
    path = Path(path)
    if not path.is_file():
        return None, []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, without its newline: cut off by a kill
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
    if not records or records[0].get("format") != FORMAT:
        raise ValueError(f"{path}: not a windowed-evaluation results file (no {FORMAT} header line)")
    return records[0], records[1:]


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_to(path: Path, header: dict[str, Any], windows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in [header, *windows]))
    tmp.replace(path)


# ---- evaluation --------------------------------------------------------------------------------------
def evaluate_windowed(
    method: torch.nn.Module,
    stream,
    path: str | Path,
    *,
    window: int = 10_000,
    method_name: str | None = None,
    device: str | torch.device = "cpu",
    description: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate `method` on `stream` window by window, appending to `path` (JSONL); resume if
    `path` holds finished windows of the same run. Returns all window records.

    `description`: what identifies the run (method, stream options...); it is stored in the header
    and a resume with a different one is refused (no mixing of runs in one file)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (images), got {window!r}")
    if window % stream.batch_size:
        raise ValueError(f"window ({window} images) must be a multiple of the batch size ({stream.batch_size})")
    if stream.resets_per_domain:
        raise ValueError("windowed evaluation is for streams that never reset (not episodic)")
    path = Path(path)
    name = method_name or getattr(method, "name", type(method).__name__)
    header = {"format": FORMAT, "method": name, "window": window, "batch_size": stream.batch_size,
              "setting": stream.setting, "seed": getattr(stream, "seed", None), "num_batches": len(stream),
              "description": description or {}}
    found, windows = read_windows(path)
    if found is not None and found != header:
        raise ValueError(f"{path} holds another run (header {found}); expected {header}. Use another path.")
    if found is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_to(path, header, [])
    else:
        _truncate_to(path, header, windows)  # drop a torn last line
        if windows:
            state = _state_path(path, len(windows) - 1)
            if not state.is_file():
                raise ValueError(f"{path}: {len(windows)} windows are finished but their state {state} is missing; "
                                 "cannot resume without redoing them (delete the file to start over)")
            load_method_state(method, torch.load(state, weights_only=True))
    per_window = window // stream.batch_size
    total = -(-len(stream) // per_window)
    batches = _batches_from(stream, len(windows) * per_window)
    for w in range(len(windows), total):
        view = _WindowView(stream, batches, min((w + 1) * per_window, len(stream)) - w * per_window)
        result = evaluate(method, view, method_name=name, device=device, progress=False)
        sizes = np.asarray(view.sizes)
        error = float(np.sum(np.asarray(result.error_over_stream) * sizes) / sizes.sum())
        record = {"window": w, "first_image": w * window, "num_images": int(sizes.sum()), "error": error,
                  "ece": result.ece, "images_per_second": result.images_per_second,
                  "skipped_updates": result.skipped_updates, "collapse_events": result.collapse_events,
                  "scheduled_resets": result.scheduled_resets}  # the last three: counts since the start
        state = _state_path(path, w)
        tmp = state.with_name(state.name + ".tmp")
        torch.save(method_state(method), tmp)
        tmp.replace(state)
        _append(path, record)
        if w > 0:
            _state_path(path, w - 1).unlink(missing_ok=True)
        windows.append(record)
    return windows


def window_errors(batch_errors: Sequence[float], batch_sizes: Sequence[int], window: int) -> list[float]:
    """Error (percent, image-weighted) per window of `window` images of a stream, from its batches'
    errors and sizes (`Result.error_over_stream`): a batch belongs to the window its first image
    falls in. A last window under half of `window` images joins the one before it, so the worst
    window is never a few images' noise."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (images), got {window!r}")
    if len(batch_errors) != len(batch_sizes) or not batch_sizes:
        raise ValueError(f"window_errors: {len(batch_errors)} batch errors for {len(batch_sizes)} batch sizes")
    sizes = np.asarray(batch_sizes, dtype=float)
    first_image = np.concatenate([[0.0], np.cumsum(sizes)[:-1]])
    index = (first_image // window).astype(int)
    if index[-1] > 0 and sizes[index == index[-1]].sum() < window / 2:
        index[index == index[-1]] -= 1
    wrong = np.bincount(index, weights=np.asarray(batch_errors, dtype=float) * sizes)
    return [float(e) for e in wrong / np.bincount(index, weights=sizes)]


# ---- guard thresholds from held-out streams ---------------------------------------------------------
def guard_signals(method: torch.nn.Module, stream, reference: torch.nn.Module,
                  device: str | torch.device = "cpu", reference_confidence: float | None = None,
                  relative_marginal: bool = False) -> dict[str, np.ndarray]:
    """Per batch of a labelled stream: the collapse guard's two signals for `method` (its argmax
    agreement with `reference`, over the images the reference predicts with at least
    `reference_confidence` if given; the class-marginal entropy of its predictions, over the reference's
    with `relative_marginal`) and the error of
    both, for choosing the guard's thresholds on held-out streams (`choose_guard_thresholds`). A batch
    with no confident reference prediction repeats the previous batch's agreement (1 for the first)."""
    rows = []
    for batch in stream:
        x, y = batch.x.to(device), batch.y.to(device)
        logits = method(x)
        with torch.no_grad():
            reference_logits = reference(x)
        agree = agreement(logits, reference_logits, reference_confidence)
        agree = agree if agree is not None else (rows[-1][0] if rows else 1.0)
        marginal = (relative_marginal_entropy(logits, reference_logits) if relative_marginal
                    else marginal_entropy(logits))
        rows.append((agree, marginal,
                     float((logits.argmax(1) != y).float().mean()) * 100,
                     float((reference_logits.argmax(1) != y).float().mean()) * 100))
    agree, marginal, error, reference_error = map(np.asarray, zip(*rows))
    return {"agreement": agree, "marginal_entropy": marginal, "error": error, "reference_error": reference_error}


def choose_guard_thresholds(signals: Sequence[dict[str, np.ndarray]], window: int = 8, tolerance: float = 0.5,
                            margin: float = 0.02, quantile: float = 0.0) -> dict[str, Any]:
    """Thresholds from the healthy stretches of the held-out runs in `signals`: over every run of
    `window` consecutive batches in which the method's error is at most the reference's +
    `tolerance` points (healthy), the `quantile` of the mean agreement and of the mean marginal
    entropy, each less `margin`. Quantile 0 (the lowest) never fires on a healthy stretch; a higher
    one also fires on some healthy stretches, and so on more of the drifting ones in between (a
    stretch's error over 512 images is noisy, so "healthy" includes some that are not)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    healthy_agreement, healthy_marginal, stretches = [], [], 0
    for run in signals:
        kernel = np.ones(window) / window
        rolling = {key: np.convolve(run[key], kernel, mode="valid") for key in run}
        healthy = rolling["error"] <= rolling["reference_error"] + tolerance
        stretches += len(healthy)
        healthy_agreement += list(rolling["agreement"][healthy])
        healthy_marginal += list(rolling["marginal_entropy"][healthy])
    if not healthy_agreement:
        raise ValueError(f"no healthy stretch of {window} batches in the held-out runs: cannot choose thresholds")
    return {"min_agreement": round(float(max(0.0, np.quantile(healthy_agreement, quantile) - margin)), 4),
            "min_marginal_entropy": round(float(max(0.0, np.quantile(healthy_marginal, quantile) - margin)), 4),
            "window": window, "healthy_stretches": len(healthy_agreement), "stretches": stretches,
            "tolerance": tolerance, "margin": margin, "quantile": quantile}


def guarded_score(batch_errors: Sequence[float], reference_errors: Sequence[float], batch_sizes: Sequence[int],
                  window: int, margin: float = 0.5) -> dict[str, Any]:
    """A guarded run on a labelled held-out stream against the lifelong target: its windows of
    `window` images above the reference's (the BN-adapted source's) + `margin`, and its mean error."""
    errors = np.asarray(window_errors(batch_errors, batch_sizes, window))
    reference = np.asarray(window_errors(reference_errors, batch_sizes, window))
    sizes = np.asarray(batch_sizes, dtype=float)
    return {"windows_above_reference": int((errors > reference + margin).sum()), "windows": len(errors),
            "mean_error": float(np.sum(np.asarray(batch_errors) * sizes) / sizes.sum())}


def choose_guard_quantile(scores: dict[float, dict[str, Any]]) -> float:
    """The candidate quantile whose guarded held-out run (`guarded_score`) has the fewest windows
    above the reference + margin, then the lowest mean error (to 0.01), then the lowest quantile
    (the guard that fires least)."""
    if not scores:
        raise ValueError("no candidate quantile was scored")
    return min(scores, key=lambda q: (scores[q]["windows_above_reference"], round(scores[q]["mean_error"], 2), q))


# ---- summary -----------------------------------------------------------------------------------------
def summarize(errors: dict[str, Sequence[float]], bn: str = "bn", source: str = "source") -> list[dict[str, Any]]:
    """Per method, over its own windows: mean error, worst window, and the windows above BN's and
    above Source's error in the same window (None when that reference is not among `errors`).
    Rows may differ in length (a slow method runs a shorter stream), but a reference must cover
    every window of every row it is compared with."""
    longest = max((len(e) for e in errors.values()), default=0)
    for reference in (bn, source):
        if reference in errors and len(errors[reference]) < longest:
            raise ValueError(f"reference {reference!r} has {len(errors[reference])} windows, fewer than the "
                             f"longest row ({longest}): it must cover every window it is compared with")
    rows = []
    for name, e in errors.items():
        e = np.asarray(e, dtype=float)
        row = {"method": name, "windows": len(e), "mean_error": float(e.mean()), "worst_window": float(e.max()),
               "worst_window_index": int(e.argmax())}
        for key, reference in (("windows_above_bn", bn), ("windows_above_source", source)):
            row[key] = int((e > np.asarray(errors[reference])[: len(e)]).sum()) if reference in errors else None
        rows.append(row)
    return rows


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: method, windows, mean error, worst window, windows above BN / Source."""
    def count(value, windows):
        return "-" if value is None else f"{value}/{windows}"

    return markdown_table(["method", "windows", "mean error", "worst window", "windows > BN", "windows > Source"],
                          [[r["method"], str(r["windows"]), f"{r['mean_error']:.2f}", f"{r['worst_window']:.2f}",
                            count(r["windows_above_bn"], r["windows"]), count(r["windows_above_source"], r["windows"])]
                           for r in rows])


GUARD_SUFFIX = "+guard"


def guard_targets(errors: dict[str, Sequence[float]], bn: str = "bn", source: str = "source",
                  margin: float = 0.5, resetting: Sequence[str] = ("rdumb",)) -> list[dict[str, Any]]:
    """The lifelong targets per row, over the row's own windows: a guarded row (`<method>+guard`)
    stays at or below BN + `margin` and below Source in every window, and its mean at or below
    the unguarded method's over the same windows; a `resetting` row (RDumb) below Source in every
    window. `met` is None where a reference is missing."""
    out = []
    for name, e in errors.items():
        guarded, base = name.endswith(GUARD_SUFFIX), name.removesuffix(GUARD_SUFFIX)
        if not guarded and name not in resetting:
            continue
        e = np.asarray(e, dtype=float)
        target = {"method": name, "windows": len(e)}
        above_source = int((e >= np.asarray(errors[source])[: len(e)]).sum()) if source in errors else None
        target["windows_not_below_source"] = above_source
        checks = [above_source == 0 if above_source is not None else None]
        if guarded:
            above_bn = int((e > np.asarray(errors[bn])[: len(e)] + margin).sum()) if bn in errors else None
            target["windows_above_bn_plus_margin"] = above_bn
            checks.append(above_bn == 0 if above_bn is not None else None)
            if base in errors:
                shared = min(len(e), len(errors[base]))
                change = float(e[:shared].mean() - np.mean(errors[base][:shared]))
                target["mean_minus_unguarded"] = change
                checks.append(change <= 0.0)
            else:
                checks.append(None)
        target["met"] = None if any(c is None for c in checks) else all(checks)
        out.append(target)
    return out


def targets_table(targets: Sequence[dict[str, Any]], margin: float = 0.5) -> str:
    def show(value, windows=None):
        if value is None:
            return "-"
        return f"{value}/{windows}" if windows is not None else f"{value:+.2f}"

    return markdown_table(
        ["row", "windows > BN + " + f"{margin:g}", "windows not below Source", "mean - unguarded mean", "met"],
        [[t["method"], show(t.get("windows_above_bn_plus_margin"), t["windows"]) if "windows_above_bn_plus_margin" in t
          else "(not guarded)", show(t["windows_not_below_source"], t["windows"]),
          show(t.get("mean_minus_unguarded")), {True: "yes", False: "no", None: "-"}[t["met"]]] for t in targets])


def plot_windows(errors: dict[str, Sequence[float]], window: int, path: str | Path, title: str = "") -> Path:
    """Windowed error of every method over the stream, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, e in errors.items():
        ax.plot((np.arange(len(e)) + 1) * window, e, label=name, lw=1.2)
    ax.set_xlabel("images")
    ax.set_ylabel(f"error per {window:,} images (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
