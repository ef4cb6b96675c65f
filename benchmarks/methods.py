"""Method benchmark: every registered method on Fashion-MNIST-C, severity 5, the 15 benchmark
corruptions, continual at batch 200 and episodic at batch 64 and 16; with `--long`, also the
10,000-image continual stream (all test images per corruption) for the continual family.

One summary table (mean error per run, ECE, img/s, peak memory, parameters adapted) to choose a
method by, then a per-corruption table per run. Methods that need a trained adapter (mgtta, cta,
ttt) run only when one is named (`--adapter cta=models:/cta@champion`); NanoAdapt and DELTA are
plug-ins and run over tent.

Writes benchmarks/results/methods.json and methods.md. A long benchmark can be split into several
processes or machines (one `--name` each) and their records joined into one report with `--combine`.

    python benchmarks/methods.py [--num-images 1000] [--runs continual:200 episodic:64 episodic:16]
                                 [--methods tent eata ...] [--long] [--adapter NAME=URI ...]
    python benchmarks/methods.py --combine methods_long_rotta methods_long_rmt --name methods_long
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.evaluation import Result
from metatta.experiment import DEFAULT_ADAPTER_METHODS, experiment_config, run_experiment
from metatta.methods import available_methods
from metatta.reporting import benchmark_command, error_table, markdown_table

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "baselines.yaml"
RUNS = ("continual:200", "episodic:64", "episodic:16")
LONG_RUN = "continual:200:10000"  # setting:batch:images per corruption (the whole test set)
LONG_IMAGES = 10000
# The methods built for a continual stream (and their usual baselines), run on the long stream.
CONTINUAL_FAMILY = ("cotta", "rotta", "rmt", "roid", "cmf", "santa", "adacontrast", "palm", "law", "eata", "tent")
NEEDS_ADAPTER = tuple(sorted(set(DEFAULT_ADAPTER_METHODS.values())))
# Plug-ins wrap another method (their `base`); benchmarked over tent, their default base.
PLUGINS = {"nanoadapt": "tent", "delta": "tent"}


def method_rows(methods: Sequence[str], adapters: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    """The config rows for `methods`, and the reason each method left out is skipped."""
    rows, skipped = [], {}
    for name in methods:
        if name in NEEDS_ADAPTER and name not in adapters:
            skipped[name] = f"needs a trained adapter (pass --adapter {name}=models:/<name>@champion)"
            continue
        row: dict = {"name": name}
        if name in PLUGINS:
            row["label"] = f"{PLUGINS[name]}+{name}"
            row["config"] = {"base": PLUGINS[name]}
        if name in adapters:
            row["adapter"] = adapters[name]
        rows.append(row)
    return rows, skipped


def parse_run(text: str) -> tuple[str, int, int | None]:
    """'continual:200' -> ('continual', 200, None); 'continual:200:10000' sets the images per corruption."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"--runs: expected setting:batch_size[:images], got {text!r}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


def run_label(setting: str, batch_size: int, num_images: int) -> str:
    return f"{setting} b{batch_size}, n{num_images}"


def summary_table(runs: dict[str, Sequence[Result]]) -> str:
    """Rows: methods, sorted by the first run's mean error; columns: mean error of every run, then
    the first run's ECE and img/s, the peak memory over all runs, and the parameters adapted."""
    if not runs:
        raise ValueError("no runs to tabulate")
    labels = list(runs)
    by_method: dict[str, dict[str, Result]] = {}
    for label, results in runs.items():
        for r in results:
            by_method.setdefault(r.method, {})[label] = r
    first = labels[0]

    def order(method: str):
        r = by_method[method].get(first)
        return (r is None, r.mean_error if r is not None else 0.0, method)

    header = ["method"] + [f"error {label}" for label in labels] + [f"ECE {first}", f"img/s {first}",
                                                                     "peak MB", "params adapted"]
    best = {label: min(r.mean_error for r in results) for label, results in runs.items() if results}
    rows = []
    for method in sorted(by_method, key=order):
        cells = by_method[method]
        row = [method]
        for label in labels:
            r = cells.get(label)
            if r is None:
                row.append("–")
            else:
                text = f"{r.mean_error:.1f}"
                row.append(f"**{text}**" if r.mean_error == best[label] and len(runs[label]) > 1 else text)
        head = cells.get(first)
        row += [f"{head.ece:.1f}" if head else "–", f"{head.images_per_second:.0f}" if head else "–"]
        row.append(f"{max(r.peak_memory_mb for r in cells.values()):.0f}")
        row.append(f"{max(r.adapted_parameters for r in cells.values()):,}")
        rows.append(row)
    return markdown_table(header, rows)


def skipped_lines(skipped: dict[str, str]) -> str:
    return "".join(f"- {name}: {why}\n" for name, why in sorted(skipped.items()))


def write_report(out: Path, name: str, command: list[str], skipped: dict[str, str], records: list[dict],
                 runs: dict[str, Sequence[Result]], sections: list[str]) -> None:
    (out / f"{name}.json").write_text(json.dumps({"command": command, "skipped": skipped, "tables": records},
                                                 indent=1))
    (out / f"{name}.md").write_text(
        f"Error (%) on Fashion-MNIST-C, severity 5, 15 corruptions. Command: `python {' '.join(command)}`\n\n"
        f"{summary_table(runs)}\n\nSkipped:\n{skipped_lines(skipped) or '- none'}\n" + "\n".join(sections))


def combine_records(parts: Sequence[dict]) -> list[dict]:
    """Join the tables of several methods.py records: results of the same run (setting, batch size,
    images per corruption) in one table, in the order the parts name them; a method measured twice
    in one run is refused (which one would the table show?)."""
    tables: dict[tuple, dict] = {}
    for part in parts:
        for table in part["tables"]:
            key = (table["setting"], table["batch_size"], table["num_images"])
            joined = tables.setdefault(key, {**table, "seconds": 0.0, "results": []})
            seen = {r["method"] for r in joined["results"]}
            twice = seen & {r["method"] for r in table["results"]}
            if twice:
                raise ValueError(f"--combine: {sorted(twice)} measured twice in {run_label(*key)}")
            joined["results"] += table["results"]
            joined["seconds"] += table["seconds"]
    return list(tables.values())


def combine(out: Path, stems: Sequence[str], name: str, command: list[str]) -> None:
    """One report (`name`.json/.md) from the records `stems` that earlier runs wrote in `out`."""
    missing = [stem for stem in stems if not (out / f"{stem}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"--combine: no {', '.join(f'{s}.json' for s in missing)} in {out}")
    parts = [json.loads((out / f"{stem}.json").read_text()) for stem in stems]
    skipped = {k: v for part in parts for k, v in part["skipped"].items()}
    records = combine_records(parts)
    runs, sections = {}, []
    for record in records:
        key = (record["setting"], record["batch_size"], record["num_images"])
        label = run_label(*key)
        results = [Result.from_dict(r) for r in record["results"]]
        runs[label] = results
        processes = sum(any((t["setting"], t["batch_size"], t["num_images"]) == key for t in part["tables"])
                        for part in parts)
        sections.append(f"#### {label} ({record['seconds']:.0f} s, summed over {processes} processes)\n\n"
                        f"{error_table(results)}\n")
    write_report(out, name, command, skipped, records, runs, sections)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="setting:batch_size[:images per corruption]")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the registered methods")
    parser.add_argument("--long", action="store_true",
                        help=f"also the {LONG_IMAGES}-image continual stream for the continual family")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=URI",
                        help="a trained adapter for mgtta, cta or ttt (models:/<name>@champion or a path)")
    parser.add_argument("--name", default="methods", help="results file stem")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--combine", nargs="+", metavar="STEM",
                        help="join the records STEM.json of earlier runs (in --out) into one report --name; runs nothing")
    args = parser.parse_args(argv)
    if args.combine:
        combine(Path(args.out), args.combine, args.name, benchmark_command(__file__, argv))
        print((Path(args.out) / f"{args.name}.md").read_text())
        return
    adapters = dict(item.split("=", 1) for item in args.adapter)
    unknown = sorted(set(args.methods or []) - set(available_methods()))
    if unknown:
        parser.error(f"--methods: unknown method(s) {unknown}; registered: {available_methods()}")
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = method_rows(args.methods or available_methods(), adapters)
    plan = [(parse_run(text), rows) for text in args.runs]
    if args.long:
        plan.append((parse_run(LONG_RUN), [r for r in rows if r["name"] in CONTINUAL_FAMILY]))
    runs, records, sections = {}, [], []
    for (setting, batch_size, images), plan_rows in plan:
        num_images = images or args.num_images
        label = run_label(setting, batch_size, num_images)
        data = load_config(BASE_CONFIG, [f"stream.setting={setting}", f"stream.batch_size={batch_size}",
                                         f"benchmark.num_images={num_images}", "progress=false",
                                         f"name=methods_{setting}_b{batch_size}_n{num_images}",
                                         f"output_dir={out / 'runs'}"])
        data["methods"] = plan_rows
        start = time.perf_counter()
        results = run_experiment(experiment_config(data))
        seconds = time.perf_counter() - start
        runs[label] = results
        records.append({"setting": setting, "batch_size": batch_size, "num_images": num_images,
                        "seconds": seconds, "results": [r.to_dict() for r in results]})
        sections.append(f"#### {label} ({seconds:.0f} s)\n\n{error_table(results)}\n")
        # written after every run, so an interrupted benchmark keeps the runs it finished
        write_report(out, args.name, benchmark_command(__file__, argv), skipped, records, runs, sections)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
