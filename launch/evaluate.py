"""Evaluate TTA methods on a corrupted benchmark: table, plot, JSON, MLflow.

    python launch/evaluate.py --config configs/fmnist_c/baselines.yaml stream.batch_size=16
    python launch/evaluate.py --config configs/fmnist_c/mgtta.yaml --adapter models:/mgg@champion
"""
from metatta.cli import experiment_parser, parse_experiment
from metatta.experiment import experiment_config, run_experiment, with_adapter


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/baselines.yaml")
    parser.add_argument("--adapter", help="trained MGG for the config's mgtta rows (added if absent): "
                                          "models:/<name>@<alias>, models:/<name>/<version> or a directory")
    args, data = parse_experiment(parser, argv)
    cfg = experiment_config(data)
    if args.adapter:
        cfg = with_adapter(cfg, args.adapter)
    run_experiment(cfg)


if __name__ == "__main__":
    main()
