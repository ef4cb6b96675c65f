"""`make demo`: the whole MGTTA pipeline on a laptop, on real data, in the regime where methods differ.

1. Fashion-MNIST-C (built once, cached) and the source model: the small LayerNorm ViT (trained once,
   cached; about 14 minutes on 2 CPU cores the first time).
2. Meta-train the MGG for it on the 4 held-out corruptions with 2 Ray rollout actors; register it in MLflow.
3. Evaluate Source, Tent, SAR, EATA, DeYO (each with its authors' ViT settings) and MGTTA (with the new
   MGG) on the 15 benchmark corruptions, severity 5, reset per corruption; print the table, save the plot.

On the ViT there are no batch statistics to re-estimate: the entropy methods stay at Source's error and
MGTTA's loss and learned optimizer are what move it (docs/results/vit.md). The ResNet pipeline, where
BatchNorm statistics do the work and every method lands within a point of BN:
    python launch/demo.py --config configs/fmnist_c/mgtta.yaml --mgg-config configs/fmnist_c/mgg_paper.yaml
"""
import logging
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import experiment_parser, parse_experiment, run_main
from metatta.config import load_config
from metatta.experiment import experiment_config, run_experiment, with_adapter
from metatta.learned.meta_training import mgg_train_config
from trainers.mgg import train_mgg

log = logging.getLogger("demo")


def main(argv=None):
    parser = experiment_parser(__doc__, default_config="configs/fmnist_c/mgtta_vit.yaml")
    parser.add_argument("--mgg-config", default="configs/fmnist_c/mgg_vit.yaml")
    parser.add_argument("--mgg-epochs", type=int, default=None, help="meta-training epochs (default: the config's)")
    args, eval_data = parse_experiment(parser, argv)
    start = time.perf_counter()
    # Check both configs before the slow part starts.
    eval_cfg = experiment_config(eval_data)
    overrides = ["num_actors=2"] + ([f"epochs={args.mgg_epochs}"] if args.mgg_epochs is not None else [])
    mgg_cfg = mgg_train_config(load_config(args.mgg_config, overrides))
    if mgg_cfg.source_config != eval_cfg.source.config:
        raise SystemExit(f"--mgg-config trains for {mgg_cfg.source_config} but --config evaluates "
                         f"{eval_cfg.source.config}: give a matching pair")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a private local instance
    try:
        outcome = train_mgg(mgg_cfg)
    finally:
        ray.shutdown()
    log.info("MGG: %d meta-steps, validation error %.2f%% on held-out corruptions, registered as %s version %s",
             outcome.steps, outcome.validation_error, mgg_cfg.register_as, outcome.registered_version)
    adapter = (f"models:/{mgg_cfg.register_as}/{outcome.registered_version}" if outcome.registered_version
               else str(outcome.adapter_dir))
    run_experiment(with_adapter(eval_cfg, adapter))
    log.info("demo finished in %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(run_main(main))
