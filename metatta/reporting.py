"""Markdown tables and PNG plots made from `Result`s."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from metatta.evaluation import Result


def short_domain(domain: str) -> str:
    """'gaussian_noise-5' -> 'gauss-5' style column headers that keep tables narrow."""
    name, _, severity = domain.rpartition("-")
    head = name.split("_")[0][:6] if name else domain
    return f"{head}-{severity}" if severity.isdigit() and name else domain


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def error_table(results: Sequence[Result], *, digits: int = 1, extra_columns: bool = True) -> str:
    """Rows: methods; columns: domains in stream order, then the mean (and speed)."""
    if not results:
        raise ValueError("no results to tabulate")
    domains = list(results[0].domain_errors)
    for r in results[1:]:
        if list(r.domain_errors) != domains:
            raise ValueError(f"results cover different domains: {r.method} has {list(r.domain_errors)}")
    header = ["method"] + [short_domain(d) for d in domains] + ["mean"]
    if extra_columns:
        header += ["ECE", "img/s"]
    rows = []
    best = min(r.mean_error for r in results)
    for r in results:
        mean = f"{r.mean_error:.{digits}f}"
        if r.mean_error == best and len(results) > 1:
            mean = f"**{mean}**"
        row = [r.method] + [f"{r.domain_errors[d]:.{digits}f}" for d in domains] + [mean]
        if extra_columns:
            row += [f"{r.ece:.1f}", f"{r.images_per_second:.0f}"]
        rows.append(row)
    return markdown_table(header, rows)


def protocol_line(result: Result) -> str:
    p = result.protocol
    keys = ("benchmark", "setting", "severities", "batch_size", "num_images", "seed", "device")
    return ", ".join(f"{k}={p[k]}" for k in keys if k in p)


def plot_results(results: Sequence[Result], path: str | Path, title: str = "") -> Path:
    """Error per domain per method; for continual-style runs also error over the stream;
    below, a heatmap of the errors (methods x domains)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    domains = list(results[0].domain_errors)
    over_stream = results[0].protocol.get("setting") not in (None, "episodic")
    ncols = 2 if over_stream else 1
    heat_height = 1.2 + 0.35 * len(results)
    fig = plt.figure(figsize=(15 if over_stream else 10, 4.5 + heat_height))
    grid = fig.add_gridspec(2, ncols, height_ratios=[4.5, heat_height])
    axes = np.array([[fig.add_subplot(grid[0, i]) for i in range(ncols)]])
    _draw_heatmap(fig, fig.add_subplot(grid[1, :]), results, domains)
    ax = axes[0, 0]
    xs = np.arange(len(domains))
    for r in results:
        ax.plot(xs, [r.domain_errors[d] for d in domains], marker="o", ms=3, label=f"{r.method} ({r.mean_error:.1f})")
    ax.set_xticks(xs, [short_domain(d) for d in domains], rotation=60, ha="right", fontsize=7)
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


def _draw_heatmap(fig, ax, results: Sequence[Result], domains: Sequence[str]) -> None:
    """Error (%) of every method (rows) on every domain (columns), plus the mean, annotated."""
    errors = np.array([[r.domain_errors[d] for d in domains] + [r.mean_error] for r in results], dtype=float)
    image = ax.imshow(errors, aspect="auto", cmap="viridis_r")
    ax.set_xticks(np.arange(len(domains) + 1), [short_domain(d) for d in domains] + ["mean"], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks(np.arange(len(results)), [r.method for r in results], fontsize=7)
    ax.axvline(len(domains) - 0.5, color="white", lw=2)
    if errors.size <= 600:  # numbers stay legible
        threshold = np.nanmean(errors)
        for (i, j), value in np.ndenumerate(errors):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6,
                    color="white" if value > threshold else "black")
    ax.set_title("error (%) per method and domain")
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)


def plot_heatmap(results: Sequence[Result], path: str | Path, title: str = "") -> Path:
    """The methods x domains error heatmap alone, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    domains = list(results[0].domain_errors)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(domains) + 3), 1.5 + 0.4 * len(results)))
    _draw_heatmap(fig, ax, results, domains)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def benchmark_command(script: str | Path, argv: Sequence[str] | None) -> list[str]:
    """The command a benchmark JSON records for `benchmarks/reproduce.py`: the script's path in
    the repository and its arguments, without `--out` (the rerun writes elsewhere)."""
    args, skip = [], False
    for arg in argv or []:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            args.append(arg)
    return [f"benchmarks/{Path(script).name}", *args]
