"""Long-running evaluation worker: evaluates each new registered MGG version once.

    python launch/eval_worker.py --config configs/fmnist_c/mgtta.yaml --model mgg
    python launch/eval_worker.py --model mgg --once        # evaluate what is pending, then exit
    python launch/eval_worker.py --model mgg --claims ray  # one worker per host of a Ray cluster

Several workers may run at once (processes, or one per Ray actor): each version
is claimed atomically by exactly one of them. `--claims file` (default) needs the
workers on one host or a shared filesystem; `--claims ray` needs only a Ray cluster.
"""
import sys

from metatta.cli import experiment_parser, parse_experiment, run_main


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/mgtta.yaml")
    parser.add_argument("--model", default="mgg", help="registered model name to watch")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between registry polls")
    parser.add_argument("--once", action="store_true", help="one poll, then exit")
    parser.add_argument("--claims", choices=("file", "ray"), default="file",
                        help="claim backend: file (one host or a shared filesystem) | ray (a detached actor "
                             "shared by the hosts of the Ray cluster at RAY_ADDRESS; default: %(default)s)")
    parser.add_argument("--claims-dir", default=None,
                        help="directory for file claims (default: beside mlflow.db); unused with --claims ray")
    args, data = parse_experiment(parser, argv)
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval}")
    from metatta.adapter_eval import EvalWorker
    from metatta.experiment import experiment_config

    worker = EvalWorker(args.model, experiment_config(data), claims_dir=args.claims_dir, claims=args.claims)
    worker.run_forever(args.interval, max_polls=1 if args.once else None)


if __name__ == "__main__":
    sys.exit(run_main(main))
