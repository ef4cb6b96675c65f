"""Markdown tables and PNG plots made from `Result`s."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metatta.evaluation import Result


def _short(domain: str) -> str:
    """'gaussian_noise-5' -> 'gauss-5' style column headers that keep tables narrow."""
    name, _, severity = domain.rpartition("-")
    head = name.split("_")[0][:6] if name else domain
    return f"{head}-{severity}" if severity.isdigit() and name else domain


def error_table(results: Sequence[Result], *, digits: int = 1, extra_columns: bool = True) -> str:
    """Rows: methods; columns: domains in stream order, then the mean (and speed)."""
    if not results:
        raise ValueError("no results to tabulate")
    domains = list(results[0].domain_errors)
    for r in results[1:]:
        if list(r.domain_errors) != domains:
            raise ValueError(f"results cover different domains: {r.method} has {list(r.domain_errors)}")
    header = ["method"] + [_short(d) for d in domains] + ["mean"]
    if extra_columns:
        header += ["ECE", "img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = min(r.mean_error for r in results)
    for r in results:
        mean = f"{r.mean_error:.{digits}f}"
        if r.mean_error == best and len(results) > 1:
            mean = f"**{mean}**"
        row = [r.method] + [f"{r.domain_errors[d]:.{digits}f}" for d in domains] + [mean]
        if extra_columns:
            row += [f"{r.ece:.1f}", f"{r.images_per_second:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def protocol_line(result: Result) -> str:
    p = result.protocol
    keys = ("benchmark", "setting", "severities", "batch_size", "num_images", "seed", "device")
    return ", ".join(f"{k}={p[k]}" for k in keys if k in p)


def plot_results(results: Sequence[Result], path: str | Path, title: str = "") -> Path:
    """Error per domain per method; for continual-style runs also error over the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    domains = list(results[0].domain_errors)
    over_stream = results[0].protocol.get("setting") not in (None, "episodic")
    fig, axes = plt.subplots(1, 2 if over_stream else 1, figsize=(15 if over_stream else 10, 4.5), squeeze=False)
    ax = axes[0, 0]
    xs = np.arange(len(domains))
    for r in results:
        ax.plot(xs, [r.domain_errors[d] for d in domains], marker="o", ms=3, label=f"{r.method} ({r.mean_error:.1f})")
    ax.set_xticks(xs, [_short(d) for d in domains], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("error (%)")
    ax.set_title("error per domain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if over_stream:
        ax = axes[0, 1]
        for r in results:
            errors = np.asarray(r.error_over_stream)
            window = max(1, len(errors) // 50)
            smooth = np.convolve(errors, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=r.method, lw=1)
        ax.set_xlabel("batch")
        ax.set_ylabel("error (%), moving average")
        ax.set_title("error over the stream")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
