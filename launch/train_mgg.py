"""Meta-train the MGG (MGTTA's learned optimizer) with Ray rollout actors.

On a cluster:   ray job submit --working-dir . -- python launch/train_mgg.py --config configs/fmnist_c/mgg.yaml
On a laptop:    python launch/train_mgg.py --config configs/fmnist_c/mgg.yaml num_actors=2 epochs=5
Resume a killed job from its last checkpoint:   ... --resume
"""
import dataclasses
import logging
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import experiment_parser, parse_experiment, require_file, require_writable_dir, run_main
from metatta.learned.meta_training import checkpoint_path, mgg_train_config
from metatta.output_paths import resolve_output_path
from trainers.cluster import connect
from trainers.mgg import train_mgg

log = logging.getLogger("train_mgg")


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/mgg.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the learner's last checkpoint")
    parser.add_argument("--no-ray", action="store_true", help="run the rollout workers in this process")
    args, data = parse_experiment(parser, argv)
    cfg = mgg_train_config(data)
    require_file(cfg.source_checkpoint, "source_checkpoint")
    require_file(cfg.source_config if cfg.source_checkpoint is None else None, "source_config")
    cfg = dataclasses.replace(cfg, checkpoint_dir=resolve_output_path(cfg.checkpoint_dir, "checkpoint_dir"))
    require_writable_dir(cfg.checkpoint_dir, "checkpoint_dir")
    if args.resume:
        require_file(checkpoint_path(cfg), "--resume: learner checkpoint")
    if not args.no_ray:
        connect()  # a running cluster (`ray job submit`, `ray start --head`), else a local one
    outcome = train_mgg(cfg, resume=args.resume, use_ray=not args.no_ray)
    log.info("trained %d steps; validation error %.2f%%; adapter %s; registered version %s%s",
             outcome.steps, outcome.validation_error, outcome.adapter_dir, outcome.registered_version,
             " (now champion)" if outcome.promoted else "")


if __name__ == "__main__":
    sys.exit(run_main(main))
