"""Ray Tune search of a TTA method's hyperparameters, one search config per method family
(configs/fmnist_c/tune_{palm,tent,eata,sar,law,deyo}.yaml; NanoAdapt, one search per batch size:
launch/tune_nanoadapt.py). Validation streams that look like the run the setting is for, built from
clean training images; the published default runs first and is kept unless the winner beats it by
more than the seed noise (docs/searches.md). Optuna + ASHA; trials in MLflow; the chosen setting
written as YAML and registered.

On a cluster:  ray job submit --working-dir . -- python launch/tune.py --config configs/fmnist_c/tune_eata.yaml
On a laptop:   python launch/tune.py --config configs/fmnist_c/tune_palm.yaml num_samples=8
Then:          python launch/evaluate.py --config configs/fmnist_c/baselines.yaml --settings eata=models:/eata_settings@champion

Any method works (`method=bn_alpha 'space={alpha: {type: uniform, low: 0, high: 1}}'`).
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

log = logging.getLogger("tune")


def main(argv=None, default_config: str = "configs/fmnist_c/tune_palm.yaml"):
    parser = experiment_parser(__doc__, default_config=default_config)
    args, data = parse_experiment(parser, argv)
    cfg = search_config(data)
    require_file(cfg.source.checkpoint, "source.checkpoint")
    require_file(cfg.source.config if cfg.source.checkpoint is None else None, "source.config")
    cfg = dataclasses.replace(cfg, output_dir=resolve_output_path(cfg.output_dir, "output_dir"))
    require_writable_dir(cfg.output_dir, "output_dir")
    connect()  # a running cluster (`ray job submit`, `ray start --head`), else a local one
    outcome = run_search(cfg)
    log.info("%s: chose the %s setting %s (%s): validation %s %.2f; wrote %s; registered version %s%s", cfg.method,
             outcome.decision["chosen"], outcome.best_params, outcome.decision["why"], cfg.metric, outcome.best_error,
             outcome.settings_path, outcome.registered_version, " (now champion)" if outcome.promoted else "")


if __name__ == "__main__":
    sys.exit(run_main(main))
