"""Long-running evaluation worker: evaluates each new registered MGG version once.

    python launch/eval_worker.py --config configs/fmnist_c/mgtta.yaml --model mgg
    python launch/eval_worker.py --model mgg --once        # evaluate what is pending, then exit

Several workers may run at once (processes, or one per Ray actor): each version
is claimed atomically by exactly one of them.
"""
from metatta.adapter_eval import EvalWorker
from metatta.cli import experiment_parser, parse_experiment
from metatta.experiment import experiment_config


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/mgtta.yaml")
    parser.add_argument("--model", default="mgg", help="registered model name to watch")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between registry polls")
    parser.add_argument("--once", action="store_true", help="one poll, then exit")
    parser.add_argument("--claims-dir", default=None, help="shared directory for claims (default: beside mlflow.db)")
    args, data = parse_experiment(parser, argv)
    worker = EvalWorker(args.model, experiment_config(data), claims_dir=args.claims_dir)
    worker.run_forever(args.interval, max_polls=1 if args.once else None)


if __name__ == "__main__":
    main()
