"""Evaluate TTA methods on a corrupted benchmark: table, plot, JSON, MLflow.

    python launch/evaluate.py --config configs/fmnist_c/baselines.yaml stream.batch_size=16
"""
from metatta.cli import experiment_parser, parse_experiment
from metatta.experiment import experiment_config, run_experiment


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/baselines.yaml")
    _, data = parse_experiment(parser, argv)
    run_experiment(experiment_config(data))


if __name__ == "__main__":
    main()
