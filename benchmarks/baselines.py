"""Baseline benchmark: every baseline method on Fashion-MNIST-C, severity 5, the
15 benchmark corruptions, continual and episodic, batch sizes 200 and 16.

Writes benchmarks/results/baselines.json and baselines.md (the README's table).

    python benchmarks/baselines.py [--num-images 1000] [--methods source bn tent ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.experiment import experiment_config, run_experiment
from metatta.reporting import benchmark_command, error_table

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "baselines.yaml"
SETTINGS = ("continual", "episodic")
BATCH_SIZES = (200, 16)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the config's methods")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections, records = [], []
    for setting in args.settings:
        for batch_size in args.batch_sizes:
            data = load_config(BASE_CONFIG, [f"stream.setting={setting}", f"stream.batch_size={batch_size}",
                                             f"benchmark.num_images={args.num_images}", "progress=false",
                                             f"name=baselines_{setting}_b{batch_size}", f"output_dir={out / 'runs'}"])
            if args.methods:
                data["methods"] = [m for m in data["methods"] if m["name"] in args.methods]
            start = time.perf_counter()
            results = run_experiment(experiment_config(data))
            seconds = time.perf_counter() - start
            records.append({"setting": setting, "batch_size": batch_size, "seconds": seconds,
                            "results": [r.to_dict() for r in results]})
            sections.append(f"#### {setting}, batch size {batch_size} ({args.num_images} images per corruption, "
                            f"{seconds:.0f} s)\n\n{error_table(results)}\n")
    command = benchmark_command(__file__, argv)
    (out / "baselines.json").write_text(json.dumps({"command": command, "tables": records}, indent=1))
    (out / "baselines.md").write_text(f"Error (%) on Fashion-MNIST-C, severity 5. Command: `python {' '.join(command)}`\n\n"
                                      + "\n".join(sections))
    print((out / "baselines.md").read_text())


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
