"""CoTTA speed: the loop of 32 augment + teacher forwards (`batched_views: false`) against the
batched views (`batched_views: true`, the default), with Tent as the reference, in one run on
the same stream (the baselines config: Fashion-MNIST-C, severity 5, continual, seed 0).

Reports images/s and mean error of each, the batched/loop speed-up, and the floor that the
number of forward passes sets: per batch Tent runs 1 forward (+ 1 backward); CoTTA runs the
anchor, the teacher (32 views when the anchor's mean confidence is below the threshold, else
1) and the student (+ 1 backward). The counts are measured (augmented batches are counted).

    python benchmarks/cotta_speed.py [--num-images 1000] [--corruptions gaussian_noise ...] [--batch-size 200]
    python benchmarks/cotta_speed.py --synthetic   # no data or checkpoint: random-init ResNet-8, random images

Writes benchmarks/results/cotta_speed.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.experiment import experiment_config, load_domains, run_experiment, source_model
from metatta.methods import build_method
from metatta.methods.augment import CoTTAAugment
from metatta.models import build_model

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "baselines.yaml"
NUM_VIEWS = 32


@contextlib.contextmanager
def count_augmentation():
    """Counts augmented batches: `views` calls (batched) and `forward` calls / 32 (loop)."""
    counts = {"views": 0, "forward": 0}
    views, forward = CoTTAAugment.views, CoTTAAugment.forward

    def counted_views(self, x, num_views, generator=None):
        counts["views"] += 1
        return views(self, x, num_views, generator)

    def counted_forward(self, x, generator=None):
        counts["forward"] += 1
        return forward(self, x, generator)

    CoTTAAugment.views, CoTTAAugment.forward = counted_views, counted_forward
    try:
        yield counts
    finally:
        CoTTAAugment.views, CoTTAAugment.forward = views, forward


def forward_floor(augmented_fraction: float, views: int = NUM_VIEWS) -> dict[str, float]:
    """Images forwarded per test image, CoTTA / Tent; with a backward counted as 2 forwards."""
    cotta_forwards = 1 + (augmented_fraction * views + (1 - augmented_fraction)) + 1  # anchor, teacher, student
    return {"forward_ratio": cotta_forwards / 1.0, "compute_ratio": (cotta_forwards + 2) / 3.0,
            "forward_calls_batched": 3.0, "forward_calls_loop": 2 + augmented_fraction * views + (1 - augmented_fraction)}


# The loop row is the code path before batching (a Python loop of 32 augment + teacher calls, NCHW);
# the batched row is the default (views folded into one batch with per-view BN statistics, NHWC).
LOOP = {"batched_views": False, "channels_last": False}
BATCHED = {"batched_views": True}


def run_interleaved(args) -> list[dict]:
    """Loop and batched CoTTA alternated over the same `--interleaved` real batches for
    `--rounds` rounds, CPU and wall seconds per batch: a ratio that holds on a shared machine,
    where two runs one after the other see different loads."""
    cfg = experiment_config(load_config(BASE_CONFIG, [f"benchmark.num_images={args.num_images}"]))
    model, _ = source_model(cfg.source, "cpu")
    batches = []
    for domain in load_domains(cfg.benchmark):
        images = torch.from_numpy(domain.images[: args.batch_size]).permute(0, 3, 1, 2).float().div(255)
        batches.append(images)
    batches = batches[: args.interleaved]
    timings = {"cotta_loop": [], "cotta_batched": []}
    for _ in range(args.rounds):
        for label, config in (("cotta_loop", LOOP), ("cotta_batched", BATCHED)):
            method = build_method("cotta", copy.deepcopy(model), config)
            cpu, wall = time.process_time(), time.perf_counter()
            for x in batches:
                method(x)
            timings[label].append(((time.process_time() - cpu) / len(batches), (time.perf_counter() - wall) / len(batches)))
    return [{"method": k, "cpu_s_per_batch": [c for c, _ in v], "wall_s_per_batch": [w for _, w in v]}
            for k, v in timings.items()]


def run_stream(args) -> list[dict]:
    setup_logging("WARNING")
    overrides = [f"stream.batch_size={args.batch_size}", f"benchmark.num_images={args.num_images}", "progress=false",
                 "name=cotta_speed", f"output_dir={Path(args.out) / 'runs'}"]
    if args.device:
        overrides.append(f"device={args.device}")
    data = load_config(BASE_CONFIG, overrides)
    if args.corruptions:
        data["benchmark"]["corruptions"] = list(args.corruptions)
    rows = []
    for label, name, config in [("tent", "tent", {}), ("cotta_loop", "cotta", LOOP),
                                ("cotta_batched", "cotta", BATCHED)]:
        data["methods"] = [{"name": name, "label": label, "config": config}]
        with count_augmentation() as counts:
            (result,) = run_experiment(experiment_config(data))
        batches = len(result.batch_domains)
        augmented = counts["views"] + counts["forward"] / NUM_VIEWS
        rows.append({"method": label, "images_per_second": result.images_per_second, "mean_error": result.mean_error,
                     "batches": batches, "augmented_batches": augmented if name == "cotta" else 0})
    return rows


def run_synthetic(args) -> list[dict]:
    """Random-init ResNet-8 on random 28x28 images; the anchor's confidence is low, so every
    batch is augmented (the worst case). Errors are meaningless here (reported as nan)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model("resnet_fmnist", num_classes=10, in_channels=1).to(device).eval()
    stream = [torch.rand(args.batch_size, 1, 28, 28, device=device) for _ in range(args.num_images // args.batch_size)]
    rows = []
    for label, name, config in [("tent", "tent", {}), ("cotta_loop", "cotta", LOOP),
                                ("cotta_batched", "cotta", BATCHED)]:
        method = build_method(name, copy.deepcopy(model), config)
        with count_augmentation() as counts:
            method(stream[0])  # warm-up, not timed
            counts["views"] = counts["forward"] = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x in stream:
                method(x).argmax(1).tolist()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        augmented = counts["views"] + counts["forward"] / NUM_VIEWS
        rows.append({"method": label, "images_per_second": len(stream) * args.batch_size / seconds,
                     "mean_error": float("nan"), "batches": len(stream),
                     "augmented_batches": augmented if name == "cotta" else 0})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--corruptions", nargs="*", default=None, help="subset (default: the config's 15)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--synthetic", action="store_true", help="no data/checkpoint needed (speed only)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--interleaved", type=int, default=0,
                        help="K > 0: alternate loop and batched over K real batches (one per corruption)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.interleaved:
        rows = run_interleaved(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        loop, batched = (min(r["wall_s_per_batch"]) for r in rows)
        loop_cpu, batched_cpu = (min(r["cpu_s_per_batch"]) for r in rows)
        (out / "cotta_interleaved.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        print(json.dumps(rows, indent=1))
        print(f"batched / loop speed-up (best round): wall {loop / batched:.2f}x, CPU time {loop_cpu / batched_cpu:.2f}x")
        return
    rows = run_synthetic(args) if args.synthetic else run_stream(args)
    by = {r["method"]: r for r in rows}
    loop, batched, tent = by["cotta_loop"], by["cotta_batched"], by["tent"]
    fraction = batched["augmented_batches"] / max(1, batched["batches"])
    summary = {
        "speedup_batched_over_loop": batched["images_per_second"] / loop["images_per_second"],
        "tent_over_cotta_loop": tent["images_per_second"] / loop["images_per_second"],
        "tent_over_cotta_batched": tent["images_per_second"] / batched["images_per_second"],
        "error_difference_batched_minus_loop": batched["mean_error"] - loop["mean_error"],
        "augmented_fraction": fraction,
        **forward_floor(fraction),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cotta_speed.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1))
    lines = ["| method | img/s | mean error (%) | augmented batches |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['images_per_second']:.1f} | {r['mean_error']:.2f} | "
              f"{r['augmented_batches']:g}/{r['batches']} |" for r in rows]
    lines += ["", f"batched / loop speed-up: {summary['speedup_batched_over_loop']:.2f}x; "
              f"Tent / CoTTA: loop {summary['tent_over_cotta_loop']:.1f}x, batched {summary['tent_over_cotta_batched']:.1f}x; "
              f"error batched - loop: {summary['error_difference_batched_minus_loop']:+.2f} points",
              f"floor: CoTTA forwards {summary['forward_ratio']:.1f} images per image against Tent's 1 "
              f"({summary['compute_ratio']:.1f}x counting a backward as 2 forwards); forward calls per batch: "
              f"loop {summary['forward_calls_loop']:.1f}, batched {summary['forward_calls_batched']:.0f}, Tent 1"]
    command = "python benchmarks/cotta_speed.py " + " ".join(argv or [])
    (out / "cotta_speed.md").write_text(f"CoTTA speed. Command: `{command.strip()}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
