"""The LayerNorm ViT benchmark: every method that adapts a ViT, with its ViT settings.

Fashion-MNIST-C, the 15 benchmark corruptions at severity 5, batch 64, the small ViT source
(configs/fmnist_c/source_vit.yaml), in two settings: episodic (reset per corruption, MGTTA's
paper) and continual. Rows, each with the settings its authors' code uses for a ViT
(configs/methods/<method>_vit.yaml; where each value comes from: docs/results/vit.md):
Source, Tent, SAR, EATA, DeYO, CoTTA, PALM, LAW, and MGTTA when `--mgg` names an MGG meta-trained
for this ViT (configs/fmnist_c/mgg_vit.yaml), at the test lr and loss it was meta-trained for.
PALM and LAW publish no ViT setting: their defaults (CIFAR-10-C, also 10 classes) on the tensors
their rules pick in a ViT (every LayerNorm and every Conv2d: the patch embedding, or a conv stem's four).

Reported (JSON + markdown, benchmarks/results/<--name>[_n<images>].{json,md}, and a plot):
- mean error and img/s per method and setting (the same machine, one run);
- error against the number of adaptation batches: the error of every method at the b-th batch of a
  corruption, averaged over the corruptions (table at a few b, plot of the whole curve);
- `--lr-sweep`: Tent, EATA, DeYO and MGTTA at x3 and x10 of their lr (x1 is the row itself);
- `--mgg-under tent eata deyo`: those methods with the MGG as their optimizer (`optimizer: mgg`);
- the targets of issue 20, computed and printed whatever they show (`targets`): the spread
  Source - best method >= 5 points; MGTTA >= 0.5 points below the best of Tent, SAR, EATA and
  DeYO (episodic); MGTTA reaching Tent's final error in fewer batches than Tent; x10 lr no worse
  than x1.

    python benchmarks/vit.py --num-images 1000 --mgg models:/mgg_vit@champion --lr-sweep
    python benchmarks/vit.py --num-images 10000 --mgg models:/mgg_vit@champion --lr-sweep
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metatta import tracking
from metatta.adaptation_speed import batches_to_reach, batches_to_within, error_curve, trailing_means
from metatta.cli import setup_logging
from metatta.evaluation import Result
from metatta.experiment import experiment_config, run_experiment
from metatta.learned.meta_training import mgg_train_config, mgtta_config
from metatta.methods.base import method_class
from metatta.reporting import benchmark_command, markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHOD_CONFIGS = ROOT / "configs" / "methods"
SOURCE_CONFIG = ROOT / "configs" / "fmnist_c" / "source_vit.yaml"
METHODS = ("source", "tent", "sar", "eata", "deyo", "cotta", "palm", "law", "mgtta")
GRADIENT_BASELINES = ("tent", "sar", "eata", "deyo")  # MGTTA's target: below the best of these
LR_SWEEP_METHODS = ("tent", "eata", "deyo", "mgtta")
LR_MULTIPLIERS = (1.0, 3.0, 10.0)
MGG_UNDER = ("tent", "eata", "deyo")
SETTINGS = ("episodic", "continual")
FISHER_IMAGES = 2000  # EATA's Fisher: 2,000 clean images (their code's --fisher_size)
CURVE_WINDOW = 5  # batches averaged where a curve is compared with an error (as benchmarks/mgtta.py)
SPREAD_TARGET = 5.0
MGTTA_MARGIN = 0.5


# ---- the rows -------------------------------------------------------------------------------------
def vit_settings_file(method: str) -> Path | None:
    """configs/methods/<method>_vit.yaml, or None where the method has no ViT setting (its defaults)."""
    path = METHOD_CONFIGS / f"{method}_vit.yaml"
    return path if path.is_file() else None


def vit_row(name: str) -> dict[str, Any]:
    """An experiment row of `name` with its ViT settings file, if it has one."""
    settings = vit_settings_file(name)
    return {"name": name, "label": name, **({"settings": str(settings)} if settings is not None else {})}


def base_lr(method: str, settings: Path | None, config: dict[str, Any]) -> float:
    """The lr a row runs at before scaling to the batch: its explicit config, its settings file's, or
    its dataclass default."""
    if "lr" in config:
        return float(config["lr"])
    if settings is not None:
        values, _ = tracking.load_settings(settings)
        if "lr" in values:
            return float(values["lr"])
    return float(method_class(method).Config().lr)


def mgg_test_config(mgg: str) -> dict[str, Any]:
    """The MGTTA config an MGG adapter was validated with (its meta-training config's test lr and
    loss, `mgtta_config`); {} for an adapter without one (MGTTA's ViT settings then)."""
    info = tracking.adapter_info(tracking.adapter_directory(mgg))
    train = info.get("train_config")
    return mgtta_config(mgg_train_config(train)) if train else {}


def method_rows(methods: Sequence[str], mgg: str | None, lr_sweep: bool,
                mgg_under: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """The experiment rows (name, label, settings, config, adapter) and the reason for each method left out."""
    rows, skipped = [], {}
    as_trained = mgg_test_config(mgg) if mgg else {}
    for name in methods:
        if name == "mgtta" and mgg is None:
            skipped[name] = "needs an MGG meta-trained for the ViT (--mgg models:/mgg_vit@champion or a directory)"
            continue
        row = vit_row(name)
        if name == "mgtta":
            row["adapter"] = mgg
            row["config"] = dict(as_trained)
        rows.append(row)
    for name in mgg_under:
        if mgg is None:
            skipped[f"{name}+mgg"] = "needs --mgg"
            continue
        base = next((r for r in rows if r["label"] == name), vit_row(name))
        rows.append({**base, "label": f"{name}+mgg", "adapter": mgg,
                     "config": {**base.get("config", {}), "optimizer": "mgg", "lr": as_trained.get("lr", 1e-3)}})
    if lr_sweep:
        for base in [r for r in rows if r["label"] in LR_SWEEP_METHODS]:
            lr = base_lr(base["name"], Path(base["settings"]) if "settings" in base else None, base.get("config", {}))
            rows += [{**base, "label": sweep_label(base["label"], m),
                      "config": {**base.get("config", {}), "lr": lr * m}} for m in LR_MULTIPLIERS if m != 1.0]
    return rows, skipped


def sweep_label(label: str, multiplier: float) -> str:
    return label if multiplier == 1.0 else f"{label} lr x{multiplier:g}"


def experiment_data(setting: str, rows: list[dict], args) -> dict[str, Any]:
    source = {"checkpoint": args.source_checkpoint} if args.source_checkpoint else {"config": args.source_config}
    benchmark = {"name": "fashion_mnist_c", "corruptions": args.corruptions or "benchmark", "severities": [5],
                 "num_images": args.num_images}
    if args.benchmark_root:
        benchmark["root"] = args.benchmark_root
    return {"name": f"vit_{setting}_n{args.num_images}", "benchmark": benchmark, "source": source,
            "stream": {"setting": setting, "batch_size": args.batch_size, "seed": 0}, "methods": rows,
            "fisher_images": args.fisher_images, "device": args.device, "mlflow": False, "progress": False,
            "output_dir": str(Path(args.out) / "runs")}


# ---- what is reported -----------------------------------------------------------------------------
def main_results(results: Sequence[Result]) -> list[Result]:
    """The rows that are not lr-sweep copies."""
    return [r for r in results if " lr x" not in r.method]


def curve_at(curve: Sequence[float], batch: int, window: int = CURVE_WINDOW) -> float:
    """Mean of the curve over the `window` batches ending at the `batch`-th (1-based)."""
    return float(np.mean(curve[max(0, batch - window):batch]))


def curve_batches(length: int) -> list[int]:
    """The batches the table shows: 1, 2, 4, 8, ... and the last."""
    marks, b = [], 1
    while b < length:
        marks.append(b)
        b *= 2
    return marks + [length]


def curve_table(results: Sequence[Result], window: int = CURVE_WINDOW) -> str:
    curves = {r.method: error_curve(r) for r in results}
    length = min(len(c) for c in curves.values())
    marks = curve_batches(length)
    header = ["method"] + [f"batch {b}" for b in marks]
    rows = [[m] + [f"{curve_at(c, b, window):.1f}" for b in marks] for m, c in curves.items()]
    return markdown_table(header, rows)


def summary_table(runs: dict[str, Sequence[Result]]) -> str:
    """Methods x settings: mean error and img/s side by side, then the parameters adapted."""
    settings = list(runs)
    by_method: dict[str, dict[str, Result]] = {}
    for setting, results in runs.items():
        for r in main_results(results):
            by_method.setdefault(r.method, {})[setting] = r
    best = {s: min(r.mean_error for r in main_results(rs) if r.method != "source") for s, rs in runs.items()
            if any(r.method != "source" for r in rs)}
    header = ["method"] + [c for s in settings for c in (f"error {s}", f"img/s {s}")] + ["params adapted"]
    rows = []
    for method, cells in by_method.items():
        row = [method]
        for s in settings:
            r = cells.get(s)
            text = "–" if r is None else f"{r.mean_error:.1f}"
            if r is not None and r.mean_error == best.get(s) and method != "source":
                text = f"**{text}**"
            row += [text, "–" if r is None else f"{r.images_per_second:.0f}"]
        row.append(f"{max(r.adapted_parameters for r in cells.values()):,}")
        rows.append(row)
    return markdown_table(header, rows)


def sweep_table(results: Sequence[Result]) -> str:
    by_label = {r.method: r.mean_error for r in results}
    rows = []
    for base in [r.method for r in main_results(results) if r.method in LR_SWEEP_METHODS]:
        cells = [by_label.get(sweep_label(base, m)) for m in LR_MULTIPLIERS]
        rows.append([base] + ["–" if c is None else f"{c:.1f}" for c in cells])
    return markdown_table(["method"] + [f"x{m:g}" for m in LR_MULTIPLIERS], rows)


def _target(value: float | int | None, threshold: float | int | None, met: bool | None, rule: str,
            **details: Any) -> dict[str, Any]:
    return {"rule": rule, "value": value, "threshold": threshold, "met": met, **details}


def targets(runs: dict[str, Sequence[Result]], window: int = CURVE_WINDOW) -> dict[str, dict[str, Any]]:
    """Issue 20's targets, per setting where they apply; `met` is None where a row they need is missing."""
    out: dict[str, dict[str, Any]] = {}
    for setting, results in runs.items():
        errors = {r.method: r.mean_error for r in results}
        main = {r.method: r.mean_error for r in main_results(results)}
        adapted = {m: e for m, e in main.items() if m != "source"}
        if "source" in main and adapted:
            best = min(adapted, key=adapted.get)
            spread = main["source"] - adapted[best]
            out[f"spread ({setting})"] = _target(spread, SPREAD_TARGET, spread >= SPREAD_TARGET,
                                                 "Source - best method >= 5 points", best=best)
        baselines = {m: main[m] for m in GRADIENT_BASELINES if m in main}
        if setting == "episodic":
            if "mgtta" in main and baselines:
                best = min(baselines, key=baselines.get)
                gap = baselines[best] - main["mgtta"]
                out["mgtta vs best gradient baseline (episodic)"] = _target(
                    gap, MGTTA_MARGIN, gap >= MGTTA_MARGIN, "best of Tent/SAR/EATA/DeYO - MGTTA >= 0.5 points",
                    best=best, mgtta=main["mgtta"], best_error=baselines[best])
            else:
                out["mgtta vs best gradient baseline (episodic)"] = _target(
                    None, MGTTA_MARGIN, None, "best of Tent/SAR/EATA/DeYO - MGTTA >= 0.5 points",
                    missing=[m for m in ("mgtta", "tent") if m not in main])
        curves = {r.method: error_curve(r) for r in main_results(results)}
        if "tent" in curves and "mgtta" in curves:
            tent_final = float(trailing_means(curves["tent"], window)[-1])
            tent_batches = batches_to_reach(curves["tent"], tent_final, window)
            mgtta_batches = batches_to_reach(curves["mgtta"], tent_final, window)
            met = mgtta_batches is not None and tent_batches is not None and mgtta_batches < tent_batches
            out[f"batches to Tent's final error ({setting})"] = _target(
                mgtta_batches, tent_batches, met, "MGTTA needs fewer batches than Tent to reach Tent's final error",
                tent_final_error=tent_final, window=window,
                batches={m: batches_to_reach(c, tent_final, window) for m, c in curves.items()})
        for method in LR_SWEEP_METHODS:
            x10 = errors.get(sweep_label(method, 10.0))
            if method in errors and x10 is not None:
                change = x10 - errors[method]
                out[f"{method} lr x10 vs x1 ({setting})"] = _target(change, 0.0, change <= 0.0,
                                                                     "error at x10 lr - error at x1 <= 0")
    return out


def target_lines(found: dict[str, dict[str, Any]]) -> list[str]:
    def show(v):
        return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    rows = [[name, t["rule"], show(t["value"]), show(t["threshold"]),
             {True: "met", False: "missed", None: "not measured"}[t["met"]]] for name, t in found.items()]
    return markdown_table(["target", "rule", "value", "threshold", ""], rows).splitlines()


def plot_curves(runs: dict[str, Sequence[Result]], path: Path, window: int = CURVE_WINDOW) -> Path:
    """Error against adaptation batches (averaged over corruptions; at batch b the mean of the `window`
    batches ending there, as the table), one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, (setting, results) in zip(axes[0], runs.items()):
        for r in main_results(results):
            curve = error_curve(r)
            batches = np.arange(1, len(curve) + 1)
            ax.plot(batches, [curve_at(curve, b, window) for b in batches], lw=1.2, ms=3,
                    marker="o" if len(curve) < 20 else None, label=f"{r.method} ({r.mean_error:.1f})")
        ax.set_xlabel("adaptation batch within a corruption")
        ax.set_ylabel(f"error (%), mean over corruptions, {window}-batch mean")
        ax.set_title(setting)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(runs: dict[str, Sequence[Result]], records: list[dict], command: list[str], skipped: dict[str, str],
           stem: str, out: Path, num_images: int, batch_size: int) -> str:
    found = targets(runs)
    plot = plot_curves(runs, out / f"{stem}.png")
    within = {s: {r.method: dict(zip(("batches", "final_error"), batches_to_within(error_curve(r))))
                  for r in main_results(rs)} for s, rs in runs.items()}
    record = {"command": command, "skipped": skipped, "runs": records, "targets": found,
              "error_curve": {s: {r.method: error_curve(r) for r in rs} for s, rs in runs.items()},
              "batches_to_within": within}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    domains = len(next(iter(runs.values()))[0].domain_errors)
    lines = [f"LayerNorm ViT (configs/fmnist_c/source_vit.yaml) on Fashion-MNIST-C, {domains} corruptions at severity 5, "
             f"batch {batch_size}, {num_images} images per corruption; each method with its ViT settings. "
             f"Command: `python {' '.join(command)}`", "",
             "Mean error (%) and img/s (same machine, one run):", "", summary_table(runs), ""]
    for setting, results in runs.items():
        lines += [f"Error (%) at the b-th adaptation batch of a corruption, averaged over corruptions "
                  f"({CURVE_WINDOW}-batch trailing mean), {setting}:", "", curve_table(main_results(results)), ""]
        if any(" lr x" in r.method for r in results):
            lines += [f"lr sweep, mean error (%), {setting} (x1: the method's ViT lr):", "", sweep_table(results), ""]
    lines += ["Targets (issue 20):", ""] + target_lines(found) + ["", f"Plot: {plot.name}"]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    return text


def result_stem(name: str, num_images: int) -> str:
    return name if num_images == 1000 else f"{name}_n{num_images}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (<= 10000)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--mgg", default=None, help="MGG for the ViT: models:/mgg_vit@champion or an adapter directory")
    parser.add_argument("--mgg-under", nargs="*", default=[], choices=MGG_UNDER,
                        help="also these methods with the MGG as their optimizer (optimizer: mgg)")
    parser.add_argument("--lr-sweep", action="store_true", help="Tent, EATA, DeYO and MGTTA at x3 and x10 lr")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fisher-images", type=int, default=FISHER_IMAGES, help="EATA's clean Fisher images")
    parser.add_argument("--source-config", default=str(SOURCE_CONFIG))
    parser.add_argument("--source-checkpoint", default=None, help="an existing ViT checkpoint instead")
    parser.add_argument("--benchmark-root", default=None, help="Fashion-MNIST-C files (built when absent)")
    parser.add_argument("--corruptions", nargs="*", default=None, help="default: the 15 benchmark corruptions")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="vit", help="results file stem (n != 1000 appends _n<images>)")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, list[Result]]:
    args = parse_args(argv)
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = method_rows(args.methods, args.mgg, args.lr_sweep, args.mgg_under)
    command, stem = benchmark_command(__file__, argv), result_stem(args.name, args.num_images)
    runs, records = {}, []
    for setting in args.settings:
        start = time.perf_counter()
        results = run_experiment(experiment_config(experiment_data(setting, rows, args)))
        runs[setting] = results
        records.append({"setting": setting, "batch_size": args.batch_size, "num_images": args.num_images,
                        "seconds": time.perf_counter() - start, "results": [r.to_dict() for r in results]})
        # written after every setting, so an interrupted benchmark keeps what it finished
        text = report(runs, records, command, skipped, stem, out, args.num_images, args.batch_size)
    print(text)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
