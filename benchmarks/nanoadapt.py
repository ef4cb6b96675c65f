"""NanoAdapt benchmark: continual Fashion-MNIST-C, the 15 benchmark corruptions at
severity 5, at batch sizes 200, 16, 4, 2 and 1: BN, Tent, BN+DELTA, Tent+DELTA,
BN+NanoAdapt, Tent+NanoAdapt (default settings, and tuned ones per batch size with `--tuned`), and at
batch size 1 the ablation rows on Tent (DBC, EWGA, DBC+EWGA; all three is
Tent+NanoAdapt) and Source (for speed). Learning rates follow the batch size
(MethodConfig.lr_batch_size).

Reports mean error per method and batch size, images per second, and at N=1 the
speed of Tent+NanoAdapt against Tent and Source (the target: at most (k + 1) times
Tent's time per image, k the number of views). Writes benchmarks/results/nanoadapt.json
and nanoadapt.md (nanoadapt_n<images>.* for other image counts).

    python benchmarks/nanoadapt.py [--num-images 1000] [--batch-sizes 200 16 4 2 1] [--tuned 1=models:/nanoadapt_settings_n1@champion ...] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.evaluation import Result
from metatta.experiment import experiment_config, run_experiment
from metatta.methods.nanoadapt import NanoAdaptConfig
from metatta.reporting import benchmark_command, markdown_table

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "baselines.yaml"
MAIN_ROWS = [
    {"name": "bn"},
    {"name": "tent"},
    {"name": "delta", "label": "bn+delta", "config": {"base": "bn"}},
    {"name": "delta", "label": "tent+delta"},
    {"name": "nanoadapt", "label": "bn+nanoadapt", "config": {"base": "bn"}},
    {"name": "nanoadapt", "label": "tent+nanoadapt"},
]
ABLATION_ROWS = [  # at batch size 1, on Tent; all three components = tent+nanoadapt
    {"name": "nanoadapt", "label": "tent+DBC", "config": {"ewga": False, "pcg": False}},
    {"name": "nanoadapt", "label": "tent+EWGA", "config": {"dbc": False, "pcg": False}},
    {"name": "nanoadapt", "label": "tent+DBC+EWGA", "config": {"pcg": False}},
    {"name": "source"},
]


def rows_for(batch_size: int, tuned: str | None) -> list[dict]:
    """The table's rows at `batch_size`; with `tuned` settings (searched at this batch size),
    a `tent+nanoadapt (tuned)` row beside the default one."""
    rows = [dict(r) for r in MAIN_ROWS]
    if tuned:
        rows.append({"name": "nanoadapt", "label": "tent+nanoadapt (tuned)", "settings": tuned})
    return rows + ([dict(r) for r in ABLATION_ROWS] if batch_size == 1 else [])


def parse_tuned(entries: list[str]) -> dict[int, str]:
    """`B=URI` entries (settings tuned at batch size B) -> {B: URI}."""
    tuned = {}
    for entry in entries:
        size, sep, uri = entry.partition("=")
        if not sep or not size.isdigit() or not uri:
            raise SystemExit(f"error: --tuned expects BATCH_SIZE=PATH_OR_URI, got {entry!r}")
        tuned[int(size)] = uri
    return tuned


def error_table(runs: dict[int, list[Result]]) -> str:
    """Mean error (%) and images per second: one row per method, one column pair per batch size."""
    sizes = list(runs)
    labels = list(dict.fromkeys(r.method for results in runs.values() for r in results))
    header = ["method"] + [f"N={b} err" for b in sizes] + [f"N={b} img/s" for b in sizes]
    rows = []
    for label in labels:
        by_size = {b: next((r for r in runs[b] if r.method == label), None) for b in sizes}
        errors = [f"{by_size[b].mean_error:.1f}" if by_size[b] else "" for b in sizes]
        speeds = [f"{by_size[b].images_per_second:.0f}" if by_size[b] else "" for b in sizes]
        rows.append([label] + errors + speeds)
    return markdown_table(header, rows)


def speed_summary(results: list[Result], num_views: int) -> dict[str, float] | None:
    """Tent+NanoAdapt's time per image at N=1 against Tent's and Source's."""
    by = {r.method: r.images_per_second for r in results}
    if not {"tent", "tent+nanoadapt"} <= set(by):
        return None
    out = {"views": num_views, "target_ratio": num_views + 1.0,
           "nanoadapt_over_tent": by["tent"] / by["tent+nanoadapt"]}
    if "source" in by:
        out["nanoadapt_over_source"] = by["source"] / by["tent+nanoadapt"]
        out["tent_over_source"] = by["source"] / by["tent"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (10000: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[200, 16, 4, 2, 1])
    parser.add_argument("--tuned", nargs="*", default=[], metavar="B=URI",
                        help="NanoAdapt settings tuned at batch size B (YAML path or models:/ URI), e.g. "
                             "1=models:/nanoadapt_settings_n1@champion: an extra row at that batch size")
    parser.add_argument("--setting", default="continual")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); batch-1 steps are latency-bound and "
                             "measured several times faster on 1 thread than on 2 busy ones")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    tuned = parse_tuned(args.tuned)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = benchmark_command(__file__, argv)  # recorded for benchmarks/reproduce.py
    runs, records = {}, []
    for batch_size in args.batch_sizes:
        data = load_config(BASE_CONFIG, [f"stream.setting={args.setting}", f"stream.batch_size={batch_size}",
                                         f"benchmark.num_images={args.num_images}", "progress=false",
                                         f"name=nanoadapt_n{batch_size}_i{args.num_images}",
                                         f"output_dir={out / 'runs'}"])
        data["methods"] = rows_for(batch_size, tuned.get(batch_size))
        start = time.perf_counter()
        runs[batch_size] = run_experiment(experiment_config(data))
        records.append({"batch_size": batch_size, "num_images": args.num_images, "setting": args.setting,
                        "threads": args.threads,
                        "seconds": time.perf_counter() - start, "results": [r.to_dict() for r in runs[batch_size]]})
    speed = speed_summary(runs[1], NanoAdaptConfig().num_views) if 1 in runs else None
    sections = [f"Fashion-MNIST-C, 15 corruptions, severity 5, {args.setting}, {args.num_images} images per "
                f"corruption. Command: `python {' '.join(command)}`\n", "Mean error (%) and images per second:\n",
                error_table(runs)]
    if speed:
        sections.append(f"\nSpeed at N=1: Tent+NanoAdapt takes {speed['nanoadapt_over_tent']:.2f}x Tent's time per "
                        f"image (target <= {speed['target_ratio']:.0f}x, k = {speed['views']} views)"
                        + (f", {speed['nanoadapt_over_source']:.2f}x Source's (Tent: {speed['tent_over_source']:.2f}x)"
                           if "nanoadapt_over_source" in speed else "") + ".")
    stem = "nanoadapt" if args.num_images == 1000 else f"nanoadapt_n{args.num_images}"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "runs": records, "speed_n1": speed}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(sections) + "\n")
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
