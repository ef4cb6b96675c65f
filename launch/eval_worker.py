"""Long-running evaluation worker: evaluates each new registered MGG version once.

    python launch/eval_worker.py --config configs/fmnist_c/mgtta.yaml --model mgg
    python launch/eval_worker.py --model mgg --once        # evaluate what is pending, then exit
    python launch/eval_worker.py --model mgg --claims ray  # one worker per host of a Ray cluster

Several workers may run at once (processes, or one per Ray actor): each version
is claimed by exactly one of them. `--claims file` (default) needs the workers
on one host or a shared filesystem; `--claims ray` needs only a Ray cluster.
A claim is a lease the worker renews while it evaluates; the claim of a worker
that died expires after `--lease` seconds and another worker takes it over.
See and release claims with `python launch/claims.py`.
"""
import dataclasses
import sys

from metatta.adapter_eval import EvalWorker
from metatta.claims import DEFAULT_LEASE_S
from metatta.cli import experiment_parser, parse_experiment, run_main
from metatta.experiment import experiment_config
from metatta.output_paths import resolve_output_path


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/mgtta.yaml")
    parser.add_argument("--model", default="mgg", help="registered model name to watch")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between registry polls")
    parser.add_argument("--once", action="store_true", help="one poll, then exit")
    parser.add_argument("--claims", choices=("file", "ray"), default="file",
                        help="claim backend: file (one host or a shared filesystem) | ray (a detached actor "
                             "shared by the hosts of the Ray cluster at RAY_ADDRESS; default: %(default)s)")
    parser.add_argument("--claims-dir", default=None,
                        help="directory for file claims; default: beside mlflow.db when MLFLOW_TRACKING_URI is "
                             "sqlite:///..., else (a tracking server) <cache root>/eval_claims on this host only, "
                             "so workers on several hosts need a shared --claims-dir or --claims ray. "
                             "Unused with --claims ray")
    parser.add_argument("--lease", type=float, default=DEFAULT_LEASE_S,
                        help="seconds a claim lasts without renewal (renewed every lease/4 while evaluating); "
                             "a dead worker's version is taken over after it (default: %(default)s)")
    args, data = parse_experiment(parser, argv)
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval}")
    if not args.lease > 0:
        raise ValueError(f"--lease must be positive, got {args.lease}")
    experiment = experiment_config(data)
    experiment = dataclasses.replace(experiment, output_dir=resolve_output_path(experiment.output_dir, "output_dir"))
    claims_dir = resolve_output_path(args.claims_dir, "--claims-dir") if args.claims_dir else None
    worker = EvalWorker(args.model, experiment, claims_dir=claims_dir, claims=args.claims, lease_s=args.lease)
    worker.run_forever(args.interval, max_polls=1 if args.once else None)


if __name__ == "__main__":
    sys.exit(run_main(main))
