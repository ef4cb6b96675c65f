"""Held-out comparison of MGG meta-training options (issue #9, part 2): the measurement that
chooses configs/fmnist_c/mgg.yaml.

Every variant is meta-trained (Ray actors, as `trainers/mgg.py` does), then MGTTA with it is
evaluated on one common validation stream of the 4 held-out corruptions (speckle_noise,
gaussian_blur, spatter, saturate; severity 5), never the 15 benchmark ones: episodic, batch 64,
`--val-images` images per corruption from row `--val-first` of the -C files. That block lies
past every row any variant trains or validates on (checked: `check_disjoint`), so the variants
are compared on the same unseen images; Source, BN, Tent, SAR and EATA (configs/fmnist_c/mgtta.yaml's
rows) are evaluated on it too. The trainer's own validation error (its rows after the training
rows: -C rows for train_data=benchmark, clean-training-split rows for train_split) is reported
beside it.

    python benchmarks/mgg_heldout.py                      # every variant below
    python benchmarks/mgg_heldout.py --variants paper k16 # some of them
    python benchmarks/mgg_heldout.py --reuse              # keep rows already measured with the same config
    python benchmarks/mgg_heldout.py --seeds 0 1          # two meta-training seeds per variant

Writes benchmarks/results/mgg_heldout.{json,md}. `--reuse` keeps a variant's row (and the
baselines) from an existing JSON when its resolved config and the validation block are unchanged,
so variants can be added one run at a time; the table is always rebuilt from all rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
import sys
import time
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.experiment import experiment_config, run_experiment
from metatta.learned.meta_training import mgg_train_config, mgtta_config
from metatta.reporting import benchmark_command
from trainers.mgg import train_mgg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs" / "fmnist_c"
BASELINES = ("source", "bn", "tent", "sar", "eata")

# name -> (config file, dotted overrides, what it tests)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "paper": ("mgg_paper.yaml", [], "the paper: K=1 lookahead, inner lr 1e-4, 128 -C images, 40 epochs"),
    "learned_step": ("mgg_learned_step.yaml", [], "paper + learned step scale, inner lr 1e-3"),
    "k4_learned_step": ("mgg_k16.yaml", ["unroll_steps=4", "name=mgg_fmnist_k4"],
                        "K=4, learned step, outer loss summed, 1,024 -C images, 10 epochs"),
    "k16_learned_step": ("mgg_k16.yaml", [], "K=16, learned step, outer loss summed, 1,024 -C images, 10 epochs"),
    "k16": ("mgg_k16.yaml", ["learned_step_size=false", "name=mgg_fmnist_k16_fixed"],
            "K=16 with the fixed step (inner lr 1e-3), summed, 1,024 -C images, 10 epochs"),
    "supervised_k1": ("mgg_supervised.yaml", ["unroll_steps=1", "learned_step_size=false",
                                              "name=mgg_fmnist_supervised_k1"],
                      "supervised outer loss (training split), K=1, fixed step, 1,024 images, 10 epochs"),
    "supervised_k8_learned_step": ("mgg_supervised.yaml", [],
                                   "supervised outer loss (training split), K=8, learned step, summed"),
    "supervised_k16_learned_step": ("mgg_supervised.yaml", ["unroll_steps=16", "name=mgg_fmnist_supervised_k16"],
                                    "supervised outer loss (training split), K=16, learned step, summed"),
    # meta-training batches of the test-time size: BN statistics of 2 images (the paper's batch) are
    # not those of the 64-image test batches the MGG then steps on
    "supervised_b16_k8_learned_step": ("mgg_supervised.yaml", ["batch_size=16", "train_images=8192",
                                                               "name=mgg_fmnist_supervised_b16"],
                                       "supervised, K=8, learned step, batch 16, 8,192 images, 10 epochs"),
    "supervised_b64_k4_learned_step": ("mgg_supervised.yaml", ["batch_size=64", "unroll_steps=4",
                                                               "train_images=8192", "name=mgg_fmnist_supervised_b64"],
                                       "supervised, K=4, learned step, batch 64, 8,192 images, 10 epochs"),
    "supervised_b64_k4_step10": ("mgg_supervised.yaml", ["batch_size=64", "unroll_steps=4", "train_images=8192",
                                                         "init_log_step_scale=2.302585", "name=mgg_fmnist_supervised_b64_s10"],
                                 "as supervised_b64_k4_learned_step, the step scale starting at 10 (room to step further)"),
    "supervised_b64_k4_step10_reliable": ("mgg_supervised.yaml", ["batch_size=64", "unroll_steps=4", "train_images=8192",
                                                                  "init_log_step_scale=2.302585", "reliable_entropy_factor=0.4",
                                                                  "name=mgg_fmnist_supervised_b64_s10_reliable"],
                                          "as supervised_b64_k4_step10, on EATA's entropy term (reliable samples, "
                                          "H < 0.4 ln C) at meta-training and test time"),
    "supervised_k1_lr_range": ("mgg_supervised.yaml", ["unroll_steps=1", "learned_step_size=false", "inner_lr_max=3e-2",
                                                       "name=mgg_fmnist_supervised_k1_lr_range"],
                               "as supervised_k1, each trajectory at an inner lr drawn from [1e-3, 3e-2]"),
    "supervised_b64_k4_step10_long": ("mgg_supervised.yaml", ["batch_size=64", "unroll_steps=4", "train_images=40960",
                                                              "epochs=2", "init_log_step_scale=2.302585",
                                                              "name=mgg_fmnist_supervised_b64_s10_long"],
                                      "as supervised_b64_k4_step10 with trajectories of up to 80 batches (40,960 "
                                      "images, 2 epochs: the same learner steps), for long test streams"),
    "lookahead_b64_k4": ("mgg_paper.yaml", ["batch_size=64", "unroll_steps=4", "train_images=6144", "epochs=10",
                                            "inner_lr=1e-3", "name=mgg_fmnist_lookahead_b64"],
                         "paper's lookahead on -C images, K=4, fixed step at inner lr 1e-3, batch 64, 6,144 images"),
}


def variant_config(name: str, extra: list[str], out: Path):
    """The checked meta-training config of a variant (trained unregistered, outside MLflow)."""
    file, overrides, _ = VARIANTS[name]
    data = load_config(CONFIGS / file, [*overrides, *extra, f"checkpoint_dir={out / 'mgg_runs'}",
                                        "register_as=null", "mlflow=false"])
    return mgg_train_config(data)


def rows_used(cfg) -> int:
    """-C rows per corruption a config trains and validates on (0 for the clean training split)."""
    if cfg.train_data != "benchmark":
        return 0
    return cfg.train_images // len(cfg.corruptions) + cfg.val_images


def check_disjoint(cfg, val_first: int) -> None:
    if rows_used(cfg) > val_first:
        raise ValueError(f"{cfg.name}: meta-training reads -C rows [0, {rows_used(cfg)}) of each held-out corruption; "
                         f"--val-first {val_first} would validate on some of them")


def experiment(out: Path, val_first: int, val_images: int, methods: list[dict[str, Any]]):
    data = load_config(CONFIGS / "mgtta.yaml", [
        "benchmark.corruptions=held_out", f"benchmark.first_image={val_first}", f"benchmark.num_images={val_images}",
        "stream.setting=episodic", "stream.batch_size=64", "progress=false", "mlflow=false",
        "name=mgg_heldout", f"output_dir={out / 'runs'}"])
    data["methods"] = methods
    return experiment_config(data)


def baseline_methods() -> list[dict[str, Any]]:
    """The benchmark's hand-made rows (configs/fmnist_c/mgtta.yaml), same configs."""
    return [m for m in load_config(CONFIGS / "mgtta.yaml")["methods"] if m["name"] in BASELINES]


def row_key(row: dict[str, Any]) -> str:
    return f"{row['variant']}@{row['config']['seed']}"


def measure_variant(name: str, cfg, out: Path, val_first: int, val_images: int) -> dict[str, Any]:
    check_disjoint(cfg, val_first)
    start = time.perf_counter()
    outcome = train_mgg(cfg, use_ray=True)
    seconds = time.perf_counter() - start
    spec = {"name": "mgtta", "label": f"mgtta ({name})", "adapter": str(outcome.adapter_dir),
            "config": mgtta_config(cfg)}
    (result,) = run_experiment(experiment(out, val_first, val_images, [spec]))
    return {"variant": name, "description": VARIANTS[name][2], "config": dataclasses.asdict(cfg),
            "K": cfg.unroll_steps, "learned_step_size": cfg.learned_step_size, "outer_loss": cfg.outer_loss,
            "train_data": cfg.train_data, "train_images": cfg.train_images, "epochs": cfg.epochs,
            "learner_steps": outcome.steps, "seconds": seconds, "step_scale": outcome.mgg.step_scale_value(),
            "trainer_validation_error": outcome.validation_error, "skipped": outcome.skipped,
            "heldout_error": result.mean_error, "heldout_domain_errors": result.domain_errors,
            "load_average": os.getloadavg()}


def measure_baselines(out: Path, val_first: int, val_images: int) -> list[dict[str, Any]]:
    results = run_experiment(experiment(out, val_first, val_images, baseline_methods()))
    return [{"method": r.method, "heldout_error": r.mean_error, "heldout_domain_errors": r.domain_errors}
            for r in results]


def by_variant(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Held-out errors of each variant over its meta-training seeds, in row order."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r["heldout_error"])
    return out


def best_variant(rows: list[dict[str, Any]]) -> str:
    """The variant with the lowest held-out error averaged over its seeds (ties to 0.01: the
    first in VARIANTS order, the simpler one)."""
    means = {v: sum(e) / len(e) for v, e in by_variant(rows).items()}
    return min(means, key=lambda v: round(means[v], 2))


def markdown(record: dict[str, Any]) -> str:
    rows, base = record["variants"], record["baselines"]
    domains = list(rows[0]["heldout_domain_errors"]) if rows else list(base[0]["heldout_domain_errors"])
    short = [d.split("-")[0][:8] for d in domains]
    lines = [f"MGG meta-training variants, MGTTA on the 4 held-out corruptions (severity 5, episodic, batch 64, "
             f"{record['val_images']} images per corruption from row {record['val_first']}, past every "
             "meta-training row). Commands (in order; each with --reuse keeps the rows before it): "
             + "; ".join(f"`python {' '.join(c)}`" for c in record.get("commands", [record["command"]])), "",
             "| variant | seed | K | learned step | outer loss | data | train images | epochs | learner steps | s | "
             "step scale | trainer val. error | " + " | ".join(short) + " | held-out error |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(domains) + "---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['config']['seed']} | {r['K']} | {'yes' if r['learned_step_size'] else 'no'} | {r['outer_loss']} | "
                     f"{'-C' if r['train_data'] == 'benchmark' else 'train split'} | {r['train_images']} | "
                     f"{r['epochs']} | {r['learner_steps']} | {r['seconds']:.0f} | {r['step_scale']:.3g} | "
                     f"{r['trainer_validation_error']:.2f} | "
                     + " | ".join(f"{r['heldout_domain_errors'][d]:.1f}" for d in domains)
                     + f" | {r['heldout_error']:.2f} |")
    if rows:
        best = best_variant(rows)
        lines += ["", "Mean over meta-training seeds (the lowest in bold: the chosen default):", "",
                  "| variant | seeds | held-out error | per seed |", "|---|---:|---:|---|"]
        for v, errors in by_variant(rows).items():
            mean = f"{sum(errors) / len(errors):.2f}"
            lines.append(f"| {v} | {len(errors)} | {f'**{mean}**' if v == best else mean} | "
                         + ", ".join(f"{e:.2f}" for e in errors) + " |")
    lines += ["", "Hand-made methods on the same stream:", "",
              "| method | " + " | ".join(short) + " | held-out error |", "|---|" + "---:|" * (len(domains) + 1)]
    for b in base:
        lines.append(f"| {b['method']} | " + " | ".join(f"{b['heldout_domain_errors'][d]:.1f}" for d in domains)
                     + f" | {b['heldout_error']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="meta-training seeds of every variant")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides for every variant, key=value")
    parser.add_argument("--val-first", type=int, default=2000, help="first -C row of the validation block")
    parser.add_argument("--val-images", type=int, default=1000, help="validation images per held-out corruption")
    parser.add_argument("--reuse", action="store_true", help="keep rows of an existing JSON measured with the same config")
    parser.add_argument("--tag", default="mgg_heldout",
                        help="result files <out>/<tag>.json and .md (mgg_heldout: the record configs/fmnist_c/mgg.yaml follows)")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.tag}.json"
    old = json.loads(path.read_text()) if args.reuse and path.is_file() else {}
    if old and (old.get("val_first"), old.get("val_images")) != (args.val_first, args.val_images):
        old = {}
    configs = {f"{name}@{seed}": (name, variant_config(name, [*args.set, f"seed={seed}"], out))
               for name in args.variants for seed in args.seeds}
    for _, cfg in configs.values():
        check_disjoint(cfg, args.val_first)  # before any work
    kept = {row_key(r): r for r in old.get("variants", [])}
    kept = {k: r for k, r in kept.items() if k not in configs or r["config"] == dataclasses.asdict(configs[k][1])}

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for key, (name, cfg) in configs.items():
            if key not in kept:
                kept[key] = measure_variant(name, cfg, out, args.val_first, args.val_images)
                print(f"{key}: held-out error {kept[key]['heldout_error']:.2f} "
                      f"(trainer's {kept[key]['trainer_validation_error']:.2f}), {kept[key]['seconds']:.0f} s",
                      flush=True)
                _write(path, old, args, argv, kept, old.get("baselines"))
    finally:
        ray.shutdown()
    baselines = old.get("baselines") or measure_baselines(out, args.val_first, args.val_images)
    print(_write(path, old, args, argv, kept, baselines))


def _write(path: Path, old: dict, args, argv, rows: dict[str, dict], baselines) -> str:
    order = sorted(rows, key=lambda k: (list(VARIANTS).index(rows[k]["variant"]), rows[k]["config"]["seed"]))
    command = benchmark_command(__file__, argv)
    commands = [c for c in old.get("commands", []) if c != command] + [command]  # --reuse: every run behind the rows
    record = {"command": command, "commands": commands, "val_first": args.val_first, "val_images": args.val_images,
              "variants": [rows[k] for k in order], "baselines": baselines or []}
    if record["variants"]:
        record["best"] = best_variant(record["variants"])
    path.write_text(json.dumps(record, indent=1))
    text = markdown(record)
    path.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
