"""Ray Tune search of a TTA method's hyperparameters on the held-out corruptions
(Optuna + ASHA; trials in MLflow; the best setting written as YAML and registered).

On a cluster:  ray job submit --working-dir . -- python launch/tune_palm.py --config configs/fmnist_c/tune_palm.yaml
On a laptop:   python launch/tune_palm.py --config configs/fmnist_c/tune_palm.yaml num_samples=8
Then:          python launch/evaluate.py --config configs/fmnist_c/baselines.yaml --settings palm=models:/palm_settings@champion

Any method works (`method=tent 'space={lr: {type: loguniform, low: 1e-5, high: 1e-2}}'`);
the NanoAdapt search uses the same trainer (trainers/tune.py).
Set MLFLOW_TRACKING_URI to an absolute sqlite:/// path under `ray job submit`, whose
working directory is a temporary copy.
"""
import dataclasses
import logging
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import experiment_parser, parse_experiment, require_file, require_writable_dir, run_main
from metatta.output_paths import resolve_output_path
from metatta.search import search_config
from trainers.cluster import connect
from trainers.tune import run_search

log = logging.getLogger("tune_palm")


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/tune_palm.yaml")
    args, data = parse_experiment(parser, argv)
    cfg = search_config(data)
    require_file(cfg.source.checkpoint, "source.checkpoint")
    require_file(cfg.source.config if cfg.source.checkpoint is None else None, "source.config")
    cfg = dataclasses.replace(cfg, output_dir=resolve_output_path(cfg.output_dir, "output_dir"))
    require_writable_dir(cfg.output_dir, "output_dir")
    connect()  # a running cluster (`ray job submit`, `ray start --head`), else a local one
    outcome = run_search(cfg)
    log.info("best %s setting %s: held-out mean error %.2f%%; wrote %s; registered version %s%s", cfg.method,
             outcome.best_params, outcome.best_error, outcome.settings_path, outcome.registered_version,
             " (now champion)" if outcome.promoted else "")


if __name__ == "__main__":
    sys.exit(run_main(main))
