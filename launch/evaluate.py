"""Evaluate TTA methods on a corrupted benchmark: table, plot, JSON, MLflow.

    python launch/evaluate.py --config configs/fmnist_c/baselines.yaml stream.batch_size=16
    python launch/evaluate.py --config configs/fmnist_c/mgtta.yaml --adapter models:/mgg@champion
"""
import dataclasses
import sys

from metatta.cli import experiment_parser, parse_experiment, require_file, require_writable_dir, run_main
from metatta.experiment import experiment_config, run_experiment, with_adapter, with_settings
from metatta.output_paths import resolve_output_path


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/baselines.yaml")
    parser.add_argument("--adapter", help="trained MGG for the config's mgtta rows (added if absent): "
                                          "models:/<name>@<alias>, models:/<name>/<version> or a directory")
    parser.add_argument("--settings", action="append", default=[], metavar="METHOD=URI",
                        help="tuned settings for METHOD's rows (added if absent): a YAML file or "
                             "models:/<name>@<alias>, e.g. palm=models:/palm_settings@champion (repeatable)")
    args, data = parse_experiment(parser, argv)
    cfg = experiment_config(data)
    if args.adapter:
        if not args.adapter.startswith("models:/"):
            require_file(args.adapter, "--adapter")
        cfg = with_adapter(cfg, args.adapter)
    for item in args.settings:
        method, sep, uri = item.partition("=")
        if not sep or not method or not uri:
            raise ValueError(f"--settings {item!r}: expected METHOD=URI")
        cfg = with_settings(cfg, method.strip(), uri.strip())
    require_file(cfg.source.checkpoint, "source.checkpoint")
    require_file(cfg.source.config if cfg.source.checkpoint is None else None, "source.config")
    cfg = dataclasses.replace(cfg, output_dir=resolve_output_path(cfg.output_dir, "output_dir"))
    require_writable_dir(cfg.output_dir, "output_dir")
    run_experiment(cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
