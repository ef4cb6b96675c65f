"""Ray Tune search of NanoAdapt's settings, one search per test batch size (default 1 and 4):
DBC's momentum m, the number of views k, the accumulation steps S and the learning rate, on
validation streams of held-out corruptions of clean training images at that batch size (Optuna +
ASHA, trials in MLflow; the search trainer is trainers/tune.py, shared with every search; the
protocol: docs/searches.md).

Each batch size B gets its own search (name `<name>_n<B>`, stream batch size B, the searched
lr fixed as the lr for batch B: `lr_batch_size: B`); the published default runs first and is
kept unless the winner beats it by more than the seed noise. The chosen setting is written as
YAML and registered as `<register_as>_n<B>` (alias `champion` = the lowest validation objective).

On a cluster:  ray job submit --working-dir . -- python launch/tune_nanoadapt.py
On a laptop:   python launch/tune_nanoadapt.py num_samples=8 'batch_sizes=[1]'
Then:          python launch/evaluate.py --config configs/fmnist_c/nanoadapt.yaml stream.batch_size=1 \\
                   --settings nanoadapt=models:/nanoadapt_settings_n1@champion
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
import sys
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import experiment_parser, parse_experiment, require_file, require_writable_dir, run_main
from metatta.config import ConfigError
from metatta.output_paths import resolve_output_path
from metatta.search import search_config
from trainers.cluster import connect
from trainers.tune import run_search

log = logging.getLogger("tune_nanoadapt")


def batch_size_searches(data: dict[str, Any]) -> list:
    """One checked SearchConfig per entry of `batch_sizes` (default: the stream's batch size)."""
    data = copy.deepcopy(data)
    sizes = data.pop("batch_sizes", None) or [data.get("stream", {}).get("batch_size", 1)]
    if not isinstance(sizes, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                for b in sizes):
        raise ConfigError(f"search.batch_sizes: expected a list of integers >= 1, got {sizes!r}")
    name = data.get("name", "tune_nanoadapt")
    register = data.get("register_as")
    register = register if register is not None else f"{data.get('method', 'nanoadapt')}_settings"
    out = []
    for b in sizes:
        d = copy.deepcopy(data)
        d["name"] = f"{name}_n{b}"
        d.setdefault("stream", {})["batch_size"] = b
        d["register_as"] = f"{register}_n{b}" if register else ""
        if "lr_batch_size" not in d.get("space", {}):
            d.setdefault("method_config", {})["lr_batch_size"] = b  # the searched lr is the lr at batch b
        out.append(search_config(d))  # checks the space's corners against the method's rules
    return out


def run_searches(data: dict[str, Any]) -> dict[int, Any]:
    """Run the search of every batch size; returns {batch size: SearchOutcome}."""
    outcomes = {}
    for cfg in batch_size_searches(data):
        outcome = run_search(cfg)
        outcomes[cfg.stream.batch_size] = outcome
        log.info("batch %d: chose the %s %s setting %s, validation %s %.2f; wrote %s; registered %s version %s%s",
                 cfg.stream.batch_size, outcome.decision["chosen"], cfg.method, outcome.best_params, cfg.metric,
                 outcome.best_error, outcome.settings_path,
                 cfg.register_as or "(not registered)", outcome.registered_version,
                 " (now champion)" if outcome.promoted else "")
    return outcomes


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/tune_nanoadapt.yaml")
    args, data = parse_experiment(parser, argv)
    searches = batch_size_searches(data)  # every search's config is checked before any runs
    first = searches[0]
    require_file(first.source.checkpoint, "source.checkpoint")
    require_file(first.source.config if first.source.checkpoint is None else None, "source.config")
    data = {**data, "output_dir": resolve_output_path(first.output_dir, "output_dir")}
    require_writable_dir(data["output_dir"], "output_dir")
    connect()  # a running cluster (`ray job submit`, `ray start --head`), else a local one
    run_searches(data)


if __name__ == "__main__":
    sys.exit(run_main(main))
