"""Train a source model on clean data; writes a checkpoint with its clean test error and feature statistics.

    python launch/train_source.py --config configs/fmnist_c/source.yaml
    python launch/train_source.py --config configs/fmnist_c/source.yaml epochs=1 num_train_images=2048 output=/tmp/s.pt
    python launch/train_source.py --config configs/fmnist_c/source.yaml --device cuda
"""
import dataclasses
import logging
import os
import sys

from metatta.cli import experiment_parser, parse_experiment, require_writable_dir, run_main
from metatta.output_paths import resolve_output_path
from metatta.source import source_train_config, train_source

log = logging.getLogger("train_source")


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/source.yaml")
    args, data = parse_experiment(parser, argv)
    cfg = source_train_config(data)
    cfg = dataclasses.replace(cfg, output=resolve_output_path(cfg.output, "output"))
    require_writable_dir(os.path.dirname(cfg.output) or ".", "output")
    result = train_source(cfg)
    log.info("%s: clean test error %.2f%% on %d images; training %.0f s, %.0f s in all (%s)", result.checkpoint,
             result.clean_test_error, result.test_images, result.train_time_s, result.total_time_s, result.device)


if __name__ == "__main__":
    sys.exit(run_main(main))
