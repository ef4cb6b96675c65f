"""MGTTA benchmark: the learned optimizer against Tent, SAR and EATA.

Fashion-MNIST-C, severity 5, batch 64, episodic (reset per corruption, as the
paper does). The MGG is meta-trained on 128 held-out-corruption images for
each unroll length K in {1, 2, 4}; meta-training throughput (unroll steps per
second) is measured with 1 and 2 rollout actors. Adaptation time per batch
and the error on the first batches of every corruption ("fewer adaptation
steps") are compared with Tent, all in one run.

Writes benchmarks/results/mgtta.json and mgtta.md.

    python benchmarks/mgtta.py [--epochs 40] [--num-images 1000]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.evaluation import Result
from metatta.experiment import MethodSpec, experiment_config, run_experiment
from metatta.reporting import benchmark_command, error_table
from trainers.mgg import mgg_train_config, train_mgg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EARLY_BATCHES = 3


def early_error(result: Result, batches: int = EARLY_BATCHES) -> float:
    """Mean error over the first `batches` batches of every domain: how fast a method adapts."""
    seen: dict[str, int] = {}
    errors = []
    for domain, error in zip(result.batch_domains, result.error_over_stream):
        seen[domain] = seen.get(domain, 0) + 1
        if seen[domain] <= batches:
            errors.append(error)
    return float(np.mean(errors))


def meta_train(base: dict, run_name: str, **overrides):
    cfg = mgg_train_config({**base, **overrides, "name": run_name})
    start = time.perf_counter()
    outcome = train_mgg(cfg, use_ray=True)
    seconds = time.perf_counter() - start
    rates = [h["unroll_steps_per_second"] for h in outcome.history[len(outcome.history) // 10:]]
    return outcome, {"K": cfg.unroll_steps, "actors": cfg.num_actors, "learner_steps": outcome.steps,
                     "seconds": seconds, "unroll_steps_per_second": float(np.median(rates)),
                     "validation_error": outcome.validation_error}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="meta-training epochs per MGG (paper: 40)")
    parser.add_argument("--scaling-epochs", type=int, default=3, help="epochs of the 1-vs-2-actor throughput runs")
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--unrolls", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(ROOT / "configs" / "fmnist_c" / "mgg.yaml",
                       [f"checkpoint_dir={out / 'mgg_runs'}", "register_as=null", "mlflow=false"])

    scaling = [meta_train(base, f"bench_scaling_a{a}", num_actors=a, epochs=args.scaling_epochs)[1] for a in (1, 2)]
    trained = {}
    for k in args.unrolls:
        outcome, stats = meta_train(base, f"bench_k{k}", unroll_steps=k, epochs=args.epochs, num_actors=2)
        trained[k] = (outcome, stats)
    ray.shutdown()

    data = load_config(ROOT / "configs" / "fmnist_c" / "mgtta.yaml",
                       [f"benchmark.num_images={args.num_images}", "progress=false", "mlflow=false",
                        "name=bench_mgtta", f"output_dir={out / 'runs'}"])
    cfg = experiment_config(data)
    baselines = [s for s in cfg.methods if s.name != "mgtta"]
    mgtta_spec = next(s for s in cfg.methods if s.name == "mgtta")
    cfg.methods = baselines + [dataclasses.replace(mgtta_spec, label=f"mgtta (K={k})", adapter=str(o.adapter_dir))
                               for k, (o, _) in trained.items()]
    results = run_experiment(cfg)
    tent = next(r for r in results if r.method == "tent")
    per_batch = {r.method: 64.0 / r.images_per_second * 1000 for r in results}

    command = benchmark_command(__file__, argv)
    record = {
        "command": command,
        "protocol": results[0].protocol,
        "meta_training": [s for _, s in trained.values()],
        "actor_scaling": scaling,
        "actor_scaling_ratio": scaling[1]["unroll_steps_per_second"] / scaling[0]["unroll_steps_per_second"],
        "results": [r.to_dict() for r in results],
        "early_error": {r.method: early_error(r) for r in results},
        "ms_per_batch": per_batch,
        "ms_per_batch_vs_tent": {m: v / per_batch["tent"] for m, v in per_batch.items()},
    }
    (out / "mgtta.json").write_text(json.dumps(record, indent=1))
    lines = [f"Fashion-MNIST-C, severity 5, batch 64, episodic, {args.num_images} images per corruption. "
             f"Command: `python {' '.join(command)}`", "", error_table(results), "",
             f"| method | mean error | error, first {EARLY_BATCHES} batches per corruption | ms per batch | vs Tent |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.method} | {r.mean_error:.1f} | {record['early_error'][r.method]:.1f} | "
                     f"{per_batch[r.method]:.1f} | {per_batch[r.method] / per_batch['tent']:.2f}x |")
    lines += ["", "Meta-training (128 held-out images, batch 2, 2 actors):", "",
              "| K | learner steps | seconds | unroll steps/s | validation error (held-out) |", "|---:|---:|---:|---:|---:|"]
    for _, s in trained.values():
        lines.append(f"| {s['K']} | {s['learner_steps']} | {s['seconds']:.0f} | {s['unroll_steps_per_second']:.1f} | "
                     f"{s['validation_error']:.1f} |")
    lines += ["", f"Actor scaling (K=1, {args.scaling_epochs} epochs): 1 actor "
              f"{scaling[0]['unroll_steps_per_second']:.1f} unroll steps/s, 2 actors "
              f"{scaling[1]['unroll_steps_per_second']:.1f} ({record['actor_scaling_ratio']:.2f}x), same run, "
              "2 CPU cores.", ""]
    (out / "mgtta.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"tent mean error {tent.mean_error:.2f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
