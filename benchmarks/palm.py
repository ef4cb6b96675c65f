"""PALM benchmark: continual and gradual Fashion-MNIST-C, the 15 benchmark
corruptions at severity 5, batch 200 (the stream of configs/fmnist_c/baselines.yaml),
Source, BN, Tent, CoTTA, LAW, PALM (published CIFAR-10-C defaults) and, when
`--tuned` names tuned settings (a YAML file or models:/palm-settings@champion from
launch/tune_palm.py), PALM tuned on the held-out corruptions.

Reports error per domain and mean, images per second, and the share of the model's
parameters each method adapted per domain (mean over the domain's batches). Writes
benchmarks/results/palm.json and palm.md.

    python benchmarks/palm.py [--num-images 1000] [--settings continual gradual] [--tuned PATH_OR_URI]
                              [--seeds 0 1 2]

`--seeds`: the stream seed (image order within each domain and the augmentation draws) of
each repetition of the continual setting; with more than one, a table of the mean error per
seed, their mean and standard deviation follows the per-domain table of the first seed, so a
difference between two methods can be read against the spread of one method over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from metatta.cli import setup_logging
from metatta.config import ConfigError, apply_override, load_config
from metatta.evaluation import Result
from metatta.experiment import experiment_config, run_experiment, source_model
from metatta.reporting import benchmark_command, error_table, markdown_table, short_domain

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "baselines.yaml"
# Rows by label; "palm (code)" is the authors' code variant, beside the default (paper) variant.
ROWS = {"source": {"name": "source"}, "bn": {"name": "bn"}, "tent": {"name": "tent"}, "cotta": {"name": "cotta"},
        "law": {"name": "law"}, "palm": {"name": "palm"},
        "palm (code)": {"name": "palm", "label": "palm (code)", "config": {"variant": "code"}}}


def share_table(results: list[Result], total_parameters: int) -> str:
    """Percent of the model's parameters adapted, per domain (mean over its batches)."""
    domains = list(results[0].domain_errors)
    header = ["method"] + [short_domain(d) for d in domains] + ["mean"]
    rows = []
    for r in results:
        shares = [100.0 * r.domain_adapted_parameters.get(d, 0.0) / total_parameters for d in domains]
        rows.append([r.method] + [f"{s:.1f}" for s in shares] + [f"{sum(shares) / len(shares):.1f}"])
    return markdown_table(header, rows)


def corruption_table(results: list[Result]) -> str:
    """Error per corruption over all its severity steps (gradual streams), the mean, img/s."""
    by_corruption: dict[str, list[str]] = {}
    for domain in results[0].domain_errors:
        by_corruption.setdefault(domain.rpartition("-")[0], []).append(domain)
    header = ["method"] + [short_domain(f"{c}-5").removesuffix("-5") for c in by_corruption] + ["mean", "img/s"]
    rows = []
    for r in results:
        cells = [sum(r.domain_errors[d] for d in ds) / len(ds) for ds in by_corruption.values()]
        rows.append([r.method] + [f"{c:.1f}" for c in cells] + [f"{r.mean_error:.1f}", f"{r.images_per_second:.0f}"])
    return markdown_table(header, rows)


def palm_row(label: str, fields: list[str], parser: argparse.ArgumentParser) -> dict:
    """An experiment row of PALM with the given config fields (FIELD=VALUE, as config overrides)."""
    config: dict = {}
    for field in fields:
        try:
            apply_override(config, field)
        except ConfigError as e:
            parser.error(f"--palm-row {label!r}: {e}")
    return {"name": "palm", "label": label, "config": config}


def seeds_table(runs: dict[int, list[Result]]) -> str:
    """Mean error per seed, and over seeds (mean, sample standard deviation), per method."""
    seeds = list(runs)
    header = ["method"] + [f"seed {s}" for s in seeds] + ["mean", "std"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for i, first in enumerate(runs[seeds[0]]):
        errors = [runs[s][i].mean_error for s in seeds]
        lines.append("| " + " | ".join([first.method] + [f"{e:.2f}" for e in errors]
                                       + [f"{statistics.mean(errors):.2f}", f"{statistics.stdev(errors):.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (10000: all)")
    parser.add_argument("--settings", nargs="*", default=["continual", "gradual"])
    parser.add_argument("--gradual-images", type=int, default=200,
                        help="gradual: images per (corruption, severity) step, 9 steps per corruption")
    parser.add_argument("--methods", nargs="*", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"rows, of {list(ROWS)}")
    parser.add_argument("--tuned", default=None, help="tuned PALM settings: YAML path or models:/ URI")
    parser.add_argument("--palm-row", nargs="+", action="append", default=[], metavar=("LABEL", "FIELD=VALUE"),
                        help="an extra PALM row: its label, then PALMConfig fields as config overrides, "
                             "e.g. --palm-row 'palm (H0 0.4)' entropy_margin_scale=absolute")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="stream seeds of the continual setting (more than one: a table over seeds)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [ROWS[m] for m in args.methods]
    if args.tuned:
        methods.append({"name": "palm", "label": "palm (tuned)", "settings": args.tuned})
    methods += [palm_row(label, fields, parser) for label, *fields in args.palm_row]
    command = benchmark_command(__file__, argv)
    sections, records = [], []
    for setting in args.settings:
        # gradual walks severities 1..5 of each corruption; num_images is then per (corruption, severity)
        gradual = setting == "gradual"
        num_images = args.gradual_images if gradual else args.num_images
        runs: dict[int, list[Result]] = {}
        for seed in ([args.seeds[0]] if gradual else args.seeds):
            data = load_config(BASE_CONFIG, [f"stream.setting={setting}", f"stream.batch_size={args.batch_size}",
                                             f"benchmark.num_images={num_images}", "progress=false",
                                             f"stream.seed={seed}", f"name=palm_{setting}_n{num_images}_s{seed}",
                                             f"output_dir={out / 'runs'}",
                                             *(["benchmark.severities=[1,2,3,4,5]"] if gradual else [])])
            data["methods"] = methods
            cfg = experiment_config(data)
            model, _ = source_model(cfg.source, "cpu")
            total = sum(p.numel() for p in model.parameters())
            start = time.perf_counter()
            runs[seed] = results = run_experiment(cfg)
            seconds = time.perf_counter() - start
            records.append({"setting": setting, "num_images": num_images, "batch_size": args.batch_size,
                            "seed": seed, "seconds": seconds, "model_parameters": total,
                            "results": [r.to_dict() for r in results]})
        first = next(iter(runs))
        results, seconds = runs[first], records[-len(runs)]["seconds"]
        if gradual:
            sections.append(f"#### gradual, batch size {args.batch_size}, {num_images} images per (corruption, "
                            f"severity) step, severities 5-1 then 1-5-1 ({seconds:.0f} s)\n\n"
                            f"Error (%) per corruption (all its steps; mean: over the 75 corruption-severity "
                            f"domains):\n\n{corruption_table(results)}\n")
            continue
        sections.append(f"#### {setting}, batch size {args.batch_size}, {num_images} images per corruption, "
                        f"seed {first} ({seconds:.0f} s)\n\nError (%):\n\n{error_table(results)}\n\n"
                        f"Parameters adapted (% of {total:,}), mean over each domain's batches:\n\n"
                        f"{share_table(results, total)}\n")
        if len(runs) > 1:
            sections.append(f"Mean error (%) over the stream seeds (image order and augmentation draws):\n\n"
                            f"{seeds_table(runs)}\n")
    stem = "palm" + ("" if args.num_images == 1000 else f"_n{args.num_images}") + \
        ("" if args.settings == ["continual", "gradual"] else "_" + "_".join(args.settings)) + \
        ("" if "gradual" not in args.settings or args.gradual_images == 200 else f"_g{args.gradual_images}")
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "tables": records}, indent=1))
    (out / f"{stem}.md").write_text(f"Fashion-MNIST-C, severity 5. Command: `python {' '.join(command)}`\n\n"
                                    + "\n".join(sections))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
