"""Train CTA's aligned SSL encoder (or the joint-training TTT baseline) on Ray Train.

On a cluster:   ray job submit --working-dir . -- python launch/train_cta.py --config configs/fmnist_c/cta.yaml
On a laptop:    python launch/train_cta.py --config configs/fmnist_c/cta.yaml num_workers=2 simclr.epochs=1
TTT baseline:   python launch/train_cta.py --config configs/fmnist_c/ttt.yaml
Resume a killed job from its stage checkpoints:   ... --resume
Then:           python launch/evaluate.py --config configs/fmnist_c/cta_eval.yaml   (CTA and TTT from the registry)
                python launch/evaluate.py --config configs/fmnist_c/baselines.yaml --adapter models:/cta@champion
"""
import logging
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import experiment_parser, parse_experiment, require_file, require_writable_dir, run_main
from metatta.output_paths import resolve_output_path
from metatta.ssl.stages import CTATrainConfig, cta_train_config, stage_files
from trainers.cluster import connect
from trainers.cta import train_cta

log = logging.getLogger("train_cta")


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/cta.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the stage checkpoints")
    parser.add_argument("--no-ray", action="store_true", help="train in this process (one worker, no Ray Train)")
    args, data = parse_experiment(parser, argv)
    # before cta_train_config, which makes it absolute against the current directory
    data = {**data, "checkpoint_dir": resolve_output_path(data.get("checkpoint_dir", CTATrainConfig.checkpoint_dir),
                                                          "checkpoint_dir")}
    cfg = cta_train_config(data)
    require_file(cfg.source_checkpoint, "source_checkpoint")
    require_file(cfg.source_config if cfg.source_checkpoint is None else None, "source_config")
    require_writable_dir(cfg.checkpoint_dir, "checkpoint_dir")
    if args.resume and not any(path.is_file() for path in stage_files(cfg).values()):
        require_file(next(iter(stage_files(cfg).values())), "--resume: stage checkpoint")
    if not args.no_ray:
        connect()  # a running cluster (`ray job submit`, `ray start --head`), else a local one
    outcome = train_cta(cfg, resume=args.resume, use_ray=not args.no_ray)
    log.info("%s: validation error %.2f%% (%.2f%% before adaptation); adapter %s; registered version %s%s",
             cfg.method, outcome.validation_error, outcome.unadapted_validation_error, outcome.adapter_dir,
             outcome.registered_version, " (now champion)" if outcome.promoted else "")


if __name__ == "__main__":
    sys.exit(run_main(main))
