"""MGTTA benchmark: the learned optimizer against Tent, SAR and EATA.

Fashion-MNIST-C, severity 5, batch 64, episodic (reset per corruption, as the
paper does). The MGG is meta-trained on the held-out corruptions by
`--config` (default configs/fmnist_c/mgg.yaml, with its K and epochs unless
`--unrolls` / `--epochs` say otherwise); meta-training throughput (unroll steps per
second) is measured with 1 and 2 rollout actors. Adaptation time per batch
and the error on the first batches of every corruption ("fewer adaptation
steps") are compared with Tent, all in one run.

Writes benchmarks/results/mgtta.json and mgtta.md (other runs: named by what they change,
e.g. mgtta_n10000_continual.*, mgtta_lr_sweep.*).

    python benchmarks/mgtta.py [--num-images 1000] [--unrolls 1 2 4] [--epochs 40]

Options for the issue-#9 evaluation (defaults keep the run above):
- `--config` / `--mgg-set`: the MGG meta-training config and dotted overrides
  (e.g. `--config configs/fmnist_c/mgg_k16.yaml`, `--mgg-set learned_step_size=true inner_lr=1e-3`);
- `--num-images 10000 --setting continual`: the whole test set, either setting;
- `--lr-multipliers 1 3 10 30`: Tent, SAR, EATA and MGTTA at those multiples
  of their default lr (MGTTA: of adapt_lr), a table of mean errors;
- `--scaling-unrolls 1 4 16`: the 1-vs-2-actor throughput at every K;
- `--mgg-under eata sar`: those methods with the MGG as their optimizer (`optimizer: mgg`),
  the learned optimizer against SGD on the very same loss;
- always: error against adaptation batches (curve in the JSON) and the
  batches each method needs to come within `--within` points of its final error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.adaptation_speed import EARLY_BATCHES, batches_to_reach, batches_to_within, early_error, error_curve
from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.evaluation import Result
from metatta.experiment import MethodSpec, experiment_config, run_experiment
from metatta.learned.meta_training import mgg_train_config, mgtta_config
from metatta.methods.base import method_class
from metatta.reporting import benchmark_command, error_table, markdown_table
from trainers.mgg import train_mgg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LR_SWEEP_METHODS = ("tent", "sar", "eata", "mgtta")


def meta_train(base: dict, run_name: str, **overrides):
    cfg = mgg_train_config({**base, **overrides, "name": run_name})
    start = time.perf_counter()
    outcome = train_mgg(cfg, use_ray=True)
    seconds = time.perf_counter() - start
    rates = [h["unroll_steps_per_second"] for h in outcome.history[len(outcome.history) // 10:]]
    return outcome, {"K": cfg.unroll_steps, "actors": cfg.num_actors, "learner_steps": outcome.steps,
                     "seconds": seconds, "unroll_steps_per_second": float(np.median(rates)),
                     "validation_error": outcome.validation_error, "skipped": outcome.skipped,
                     "step_scale": outcome.mgg.step_scale_value()}


def images_for(base: dict, k: int, actors: int = 2) -> int:
    """Training images an unroll of K needs (K + 1 batches per actor and corruption), at least the config's."""
    corruptions = len(base.get("corruptions", [None] * 4))
    return max(base.get("train_images", 128), (k + 1) * base.get("batch_size", 2) * actors * corruptions)


def reused_adapter(directory: str) -> tuple[int, tuple[Any, dict]]:
    """(K, (outcome-like, meta-training stats)) of an MGG adapter an earlier run trained
    (`--adapter`: e.g. the lr sweep on the README run's MGG instead of training another)."""
    info = json.loads((Path(directory) / "adapter.json").read_text())
    train = info.get("train_config", {})
    k = int(train.get("unroll_steps", 1))
    stats = {"K": k, "actors": train.get("num_actors"), "learner_steps": info.get("steps", 0),
             "seconds": float("nan"), "unroll_steps_per_second": float("nan"),
             "validation_error": info.get("validation_error", float("nan")), "reused_adapter": str(directory)}
    return k, (SimpleNamespace(adapter_dir=Path(directory)), stats)


def actor_scaling(base: dict, unrolls: list[int], epochs: int) -> list[dict]:
    """Throughput of 1 and 2 rollout actors at every K, same config otherwise (with more training
    images where K needs them: both actor counts get the same images)."""
    return [meta_train(base, f"bench_scaling_k{k}_a{a}", num_actors=a, unroll_steps=k, epochs=epochs,
                       train_images=images_for(base, k))[1]
            for k in unrolls for a in (1, 2)]


def scaling_ratios(scaling: list[dict]) -> dict[int, float]:
    rate = {(s["K"], s["actors"]): s["unroll_steps_per_second"] for s in scaling}
    return {k: rate[(k, 2)] / rate[(k, 1)] for k, a in rate if a == 1}


def lr_sweep_specs(specs: list[MethodSpec], multipliers: list[float]) -> list[MethodSpec]:
    """Copies of the Tent, SAR, EATA and MGTTA rows at lr x m (m != 1; x1 is the row itself)."""
    out = []
    for spec in specs:
        base_name = spec.name
        if base_name not in LR_SWEEP_METHODS:
            continue
        lr = spec.config.get("lr", method_class(base_name).Config().lr)
        out += [dataclasses.replace(spec, label=f"{spec.label or spec.name} lr x{m:g}", config={**spec.config, "lr": lr * m})
                for m in multipliers if m != 1]
    return out


def mgg_under(spec: MethodSpec, k: int, adapter: Path, lr: float) -> MethodSpec:
    """`spec`'s method with the MGG as its optimizer (its own loss, sample selection and
    regularizer unchanged), at the adapt_lr the MGG was validated at."""
    return dataclasses.replace(spec, label=f"{spec.label or spec.name}+mgg (K={k})", adapter=str(adapter),
                               config={**spec.config, "optimizer": "mgg", "lr": lr})


def sweep_table(results: list[Result], multipliers: list[float]) -> list[str]:
    by_label = {r.method: r.mean_error for r in results}
    rows = []
    for r in results:
        if " lr x" in r.method or r.method.split(" ")[0].split("+")[0] not in LR_SWEEP_METHODS:
            continue
        cells = [by_label.get(r.method if m == 1 else f"{r.method} lr x{m:g}") for m in multipliers]
        rows.append([r.method] + ["-" if c is None else f"{c:.1f}" for c in cells])
    return markdown_table(["method"] + [f"x{m:g}" for m in multipliers], rows).splitlines()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="meta-training epochs per MGG (default: the config's)")
    parser.add_argument("--scaling-epochs", type=int, default=3, help="epochs of the 1-vs-2-actor throughput runs")
    parser.add_argument("--scaling-unrolls", nargs="*", type=int, default=[1],
                        help="K of the throughput runs (none given: skip them)")
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (<= 10000)")
    parser.add_argument("--setting", default="episodic", choices=("episodic", "continual"))
    parser.add_argument("--unrolls", nargs="*", type=int, default=None,
                        help="unroll lengths K, one MGG each (default: the config's K)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "fmnist_c" / "mgg.yaml"),
                        help="MGG meta-training config")
    parser.add_argument("--adapter", default=None,
                        help="an MGG adapter directory an earlier run trained: evaluate it instead of meta-training")
    parser.add_argument("--mgg-set", nargs="*", default=[], help="dotted overrides of the MGG config, key=value")
    parser.add_argument("--lr-multipliers", nargs="*", type=float, default=[],
                        help="lr sweep of Tent, SAR, EATA and MGTTA, e.g. 1 3 10 30")
    parser.add_argument("--mgg-under", nargs="*", default=[], choices=("tent", "sar", "eata"),
                        help="also these methods stepped by the MGG (`optimizer: mgg` at the MGG's adapt_lr): "
                             "the same loss, the learned optimizer instead of SGD")
    parser.add_argument("--within", type=float, default=0.2, help="points from the final error (batches table)")
    parser.add_argument("--curve-window", type=int, default=5, help="batches averaged in the batches table")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def result_stem(args) -> str:
    """`mgtta` for the README's default run; other runs are named by what they change, so that
    they sit beside it instead of overwriting it."""
    parts = ["mgtta"]
    if args.num_images != 1000:
        parts.append(f"n{args.num_images}")
    if args.setting != "episodic":
        parts.append(args.setting)
    if Path(args.config).name != "mgg.yaml":
        parts.append(Path(args.config).stem)
    if args.mgg_set:
        parts.append("set")
    if args.lr_multipliers:
        parts.append("lr_sweep")
    if args.mgg_under:
        parts.append("mgg_under")
    return "_".join(parts)


def main(argv=None):
    args = parse_args(argv)
    setup_logging("WARNING")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config, [*args.mgg_set, f"checkpoint_dir={out / 'mgg_runs'}", "register_as=null",
                                     "mlflow=false"])

    scaling = actor_scaling(base, args.scaling_unrolls, args.scaling_epochs)
    ratios = scaling_ratios(scaling)
    trained = {}
    epochs = base.get("epochs", 40) if args.epochs is None else args.epochs
    if args.adapter:
        k, reused = reused_adapter(args.adapter)
        trained[k] = reused
    for k in [] if args.adapter else args.unrolls or [base.get("unroll_steps", 1)]:
        outcome, stats = meta_train(base, f"bench_k{k}", unroll_steps=k, epochs=epochs, num_actors=2)
        trained[k] = (outcome, stats)
    ray.shutdown()

    data = load_config(ROOT / "configs" / "fmnist_c" / "mgtta.yaml",
                       [f"benchmark.num_images={args.num_images}", f"stream.setting={args.setting}", "progress=false",
                        "mlflow=false", "name=bench_mgtta", f"output_dir={out / 'runs'}"])
    cfg = experiment_config(data)
    baselines = [s for s in cfg.methods if s.name != "mgtta"]
    mgtta_spec = next(s for s in cfg.methods if s.name == "mgtta")
    as_trained = mgtta_config(mgg_train_config(base))  # the test lr and loss the MGG was meta-trained for
    mgtta_rows = [dataclasses.replace(mgtta_spec, label=f"mgtta (K={k})", adapter=str(o.adapter_dir),
                                      config={**mgtta_spec.config, **as_trained})
                  for k, (o, _) in trained.items()]
    mgtta_rows += [mgg_under(spec, k, o.adapter_dir, as_trained["lr"])
                   for spec in baselines if spec.name in args.mgg_under for k, (o, _) in trained.items()]
    cfg.methods = baselines + mgtta_rows + lr_sweep_specs(baselines + mgtta_rows, args.lr_multipliers)
    results = run_experiment(cfg)
    main_results = [r for r in results if " lr x" not in r.method]
    tent = next(r for r in results if r.method == "tent")
    per_batch = {r.method: 64.0 / r.images_per_second * 1000 for r in results}
    curves = {r.method: error_curve(r) for r in results}
    to_final = {m: batches_to_within(c, args.within, args.curve_window) for m, c in curves.items()}
    tent_final = to_final["tent"][1]
    to_tent = {m: batches_to_reach(c, tent_final, args.curve_window) for m, c in curves.items()}

    command = benchmark_command(__file__, argv)
    first_k = args.scaling_unrolls[0] if args.scaling_unrolls else None
    first = [s for s in scaling if s["K"] == first_k]
    record = {
        "command": command,
        "protocol": results[0].protocol,
        "meta_training": [s for _, s in trained.values()],
        "actor_scaling": first,
        "actor_scaling_ratio": ratios.get(first_k),
        "actor_scaling_by_K": scaling,
        "actor_scaling_ratio_by_K": ratios,
        "results": [r.to_dict() for r in results],
        "early_error": {r.method: early_error(r) for r in results},
        "ms_per_batch": per_batch,
        "ms_per_batch_vs_tent": {m: v / per_batch["tent"] for m, v in per_batch.items()},
        "error_curve": curves,
        "batches_to_within": {m: {"batches": b, "final_error": f, "within": args.within, "window": args.curve_window}
                              for m, (b, f) in to_final.items()},
        "batches_to_tent_final": {"tent_final_error": tent_final, "window": args.curve_window, "batches": to_tent},
        "lr_multipliers": args.lr_multipliers,
    }
    stem = result_stem(args)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    lines = [f"Fashion-MNIST-C, severity 5, batch 64, {args.setting}, {args.num_images} images per corruption. "
             f"Command: `python {' '.join(command)}`", "", error_table(main_results), "",
             f"| method | mean error | error, first {EARLY_BATCHES} batches per corruption | ms per batch | vs Tent |",
             "|---|---:|---:|---:|---:|"]
    for r in main_results:
        lines.append(f"| {r.method} | {r.mean_error:.1f} | {record['early_error'][r.method]:.1f} | "
                     f"{per_batch[r.method]:.1f} | {per_batch[r.method] / per_batch['tent']:.2f}x |")
    lines += ["", f"Batches to come within {args.within} points of the final error (mean of the last "
              f"{args.curve_window} batches; curve averaged over corruptions, {args.curve_window}-batch window):", "",
              f"| method | final error | batches | batches to Tent's final error ({tent_final:.1f}) |",
              "|---|---:|---:|---:|"]
    lines += [f"| {r.method} | {to_final[r.method][1]:.1f} | {to_final[r.method][0]} | "
              f"{'never' if to_tent[r.method] is None else to_tent[r.method]} |" for r in main_results]
    if args.lr_multipliers:
        lines += ["", "Mean error at lr x m of each method's default (MGTTA: adapt_lr):", ""]
        lines += sweep_table(results, sorted({1.0, *args.lr_multipliers}))
    lines += ["", f"Meta-training ({Path(args.config).name}{' ' + ' '.join(args.mgg_set) if args.mgg_set else ''}, "
              "2 actors):", "",
              "| K | learner steps | seconds | unroll steps/s | validation error (held-out) |", "|---:|---:|---:|---:|---:|"]
    for _, s in trained.values():
        lines.append(f"| {s['K']} | {s['learner_steps']} | {s['seconds']:.0f} | {s['unroll_steps_per_second']:.1f} | "
                     f"{s['validation_error']:.1f} |")
    rate = {(s["K"], s["actors"]): s["unroll_steps_per_second"] for s in scaling}
    lines += [""] + [f"Actor scaling (K={k}, {args.scaling_epochs} epochs): 1 actor {rate[(k, 1)]:.1f} unroll steps/s, "
                     f"2 actors {rate[(k, 2)]:.1f} ({ratios[k]:.2f}x), same run, 2 CPU cores." for k in ratios] + [""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"tent mean error {tent.mean_error:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
