"""GPU check: the parts of metatta that run on a CUDA device, each timed against the same
machine's CPU in one run (these machines are noisy; ratios from one run are what compare).

1. Fashion-MNIST-C built on the GPU and on the CPU: seconds, and how far the GPU's 8-bit
   images are from the CPU's (mean |difference| in levels, share of pixels that differ).
2. Evaluation: Source, BN and Tent on the 15 benchmark corruptions (severity 5, continual,
   batches of 64 and 200): images/s and mean error on CUDA and on the CPU. The errors must agree to float
   noise; a larger gap is a device bug.
3. MGG meta-training through Ray actors (`train_mgg(use_ray=True)`): unroll steps per second
   with 1 and 2 actors, at every K, on CUDA (2 actors share the one GPU,
   `trainers.mgg.gpus_per_actor`) and on the CPU (one core per actor).

    python benchmarks/gpu.py [--num-images 1000] [--batch-sizes 64 200] [--unrolls 1 4] [--learner-steps 24]

Writes benchmarks/results/gpu.json and gpu.md (`--out` elsewhere). Needs CUDA and a source
checkpoint (trained on first use, as every benchmark's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.data.benchmark_files import fashion_mnist_c, read_cifar_c
from metatta.data.domains import ALL_CORRUPTIONS, HELD_OUT_CORRUPTIONS
from metatta.experiment import experiment_config, run_experiment
from metatta.reporting import benchmark_command, markdown_table
from metatta.learned.meta_training import mgg_train_config, split_domains, steps_per_epoch
from trainers.mgg import train_mgg

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "fmnist_c"
EVAL_METHODS = ("source", "bn", "tent")


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def corruption_build(devices: dict[str, str], num_images: int, work: Path) -> dict:
    """All 19 corruptions of the first `num_images` test images, built on each device."""
    seconds, images = {}, {}
    for label, device in devices.items():
        root, seconds[label] = timed(fashion_mnist_c, work / f"c_{label}", num_images, progress=False, device=device)
        images[label] = {d.corruption: d.images for d in read_cifar_c(root, ALL_CORRUPTIONS, [5])}
    diffs = {c: np.abs(images["gpu"][c].astype(np.int16) - images["cpu"][c].astype(np.int16)) for c in ALL_CORRUPTIONS}
    return {"images_per_corruption": num_images, "seconds": seconds, "cpu_over_gpu": seconds["cpu"] / seconds["gpu"],
            "mean_abs_level_difference": {c: float(d.mean()) for c, d in diffs.items()},
            "pixels_differing": {c: float((d > 0).mean()) for c, d in diffs.items()}}


def evaluation(devices: dict[str, str], root: Path, num_images: int, batch_sizes: list[int], out: Path) -> list[dict]:
    """Each device's first model run pays its start-up (CUDA context, cuDNN): an unmeasured
    Source pass goes first."""
    rows = []
    for label, device in devices.items():
        for batch_size in batch_sizes:
            data = load_config(CONFIGS / "baselines.yaml", [
                f"stream.batch_size={batch_size}", f"benchmark.root={root}", f"benchmark.num_images={num_images}",
                f"device={device}", "mlflow=false", "progress=false", f"name=gpu_eval_{label}_b{batch_size}",
                f"output_dir={out / 'runs'}"])
            data["methods"] = [{"name": "source", "label": "warm-up"}] + [
                m for m in data["methods"] if m["name"] in EVAL_METHODS]
            for result in run_experiment(experiment_config(data))[1:]:
                rows.append({"method": result.method, "device": label, "batch_size": batch_size,
                             "mean_error": result.mean_error, "images_per_second": result.images_per_second})
    return rows


def meta_training(devices: dict[str, str], unrolls: list[int], learner_steps: int, benchmark_root: Path,
                  work: Path) -> list[dict]:
    """Unroll steps per second of the default MGG setup (batch 64) on the -C files, lookahead
    outer loss (the supervised one needs the clean training split; the compute is the same)."""
    import ray

    base = load_config(CONFIGS / "mgg.yaml", [
        "train_data=benchmark", "outer_loss=lookahead", "mlflow=false", "register_as=null", "val_images=64",
        f"benchmark_root={benchmark_root}", f"checkpoint_dir={work / 'mgg'}", "checkpoint_every=1000"])
    per_domain = len(read_cifar_c(benchmark_root, HELD_OUT_CORRUPTIONS[:1], [5])[0])
    rows = []
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for k in unrolls:
            for label, device in devices.items():
                for actors in (1, 2):
                    cfg = mgg_train_config({**base, "name": f"gpu_k{k}_{label}_a{actors}", "unroll_steps": k,
                                            "num_actors": actors, "device": device,
                                            "train_images": (per_domain - base["val_images"]) * len(base["corruptions"])})
                    shares, _ = split_domains(read_cifar_c(benchmark_root, cfg.corruptions, [5]), cfg)
                    cfg.epochs = max(1, -(-learner_steps // steps_per_epoch(shares, cfg)))
                    start = time.perf_counter()
                    outcome = train_mgg(cfg, use_ray=True)
                    seconds = time.perf_counter() - start
                    rates = [h["unroll_steps_per_second"] for h in outcome.history[len(outcome.history) // 10:]]
                    rows.append({"K": k, "device": label, "actors": actors, "learner_steps": outcome.steps,
                                 "seconds": seconds, "unroll_steps_per_second": float(np.median(rates))})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    return rows


def report(record: dict) -> str:
    build = record["corruption_build"]
    worst = max(build["mean_abs_level_difference"], key=build["mean_abs_level_difference"].get)
    lines = [f"GPU check ({record['gpu']}, torch {record['torch']}). Command: `python {' '.join(record['command'])}`",
             "", f"Fashion-MNIST-C, 19 corruptions x {build['images_per_corruption']} images: "
             f"{build['seconds']['gpu']:.1f} s on the GPU, {build['seconds']['cpu']:.1f} s on the CPU "
             f"({build['cpu_over_gpu']:.1f}x); largest mean |GPU - CPU| {build['mean_abs_level_difference'][worst]:.3f} "
             f"levels ({worst}).", ""]
    ev = {(r["method"], r["device"], r["batch_size"]): r for r in record["evaluation"]}
    keys = list(dict.fromkeys((r["method"], r["batch_size"]) for r in record["evaluation"]))
    lines += ["Evaluation, 15 corruptions, continual:", "", markdown_table(
        ["method", "batch", "error GPU", "error CPU", "img/s GPU", "img/s CPU", "GPU / CPU"],
        [[m, b, f"{ev[m, 'gpu', b]['mean_error']:.2f}", f"{ev[m, 'cpu', b]['mean_error']:.2f}",
          f"{ev[m, 'gpu', b]['images_per_second']:.0f}", f"{ev[m, 'cpu', b]['images_per_second']:.0f}",
          f"{ev[m, 'gpu', b]['images_per_second'] / ev[m, 'cpu', b]['images_per_second']:.1f}x"]
         for m, b in keys]), ""]
    mt = {(r["K"], r["device"], r["actors"]): r["unroll_steps_per_second"] for r in record["meta_training"]}
    ks = sorted({r["K"] for r in record["meta_training"]})
    lines += ["MGG meta-training through Ray actors (batch 64), unroll steps per second:", "", markdown_table(
        ["K", "GPU 1 actor", "GPU 2 actors (one GPU)", "2 / 1", "CPU 1 actor", "CPU 2 actors", "2 / 1",
         "GPU / CPU (1 actor)"],
        [[k, f"{mt[k, 'gpu', 1]:.1f}", f"{mt[k, 'gpu', 2]:.1f}", f"{mt[k, 'gpu', 2] / mt[k, 'gpu', 1]:.2f}x",
          f"{mt[k, 'cpu', 1]:.1f}", f"{mt[k, 'cpu', 2]:.1f}", f"{mt[k, 'cpu', 2] / mt[k, 'cpu', 1]:.2f}x",
          f"{mt[k, 'gpu', 1] / mt[k, 'cpu', 1]:.1f}x"] for k in ks])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[64, 200], help="of the evaluation")
    parser.add_argument("--unrolls", nargs="*", type=int, default=[1, 4], help="K of the meta-training runs")
    parser.add_argument("--learner-steps", type=int, default=24, help="learner steps per meta-training run (at least)")
    parser.add_argument("--gpu", default="cuda", help="the device under test (cpu: a dry run of the script)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if args.gpu == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs CUDA")
    devices = {"gpu": args.gpu, "cpu": "cpu"}
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": benchmark_command(__file__, argv), "gpu": torch.cuda.get_device_name() if args.gpu == "cuda" else args.gpu,
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        record["corruption_build"] = corruption_build(devices, args.num_images, work)
        print(json.dumps(record["corruption_build"]["seconds"]), flush=True)
        record["evaluation"] = evaluation(devices, work / "c_gpu", args.num_images, args.batch_sizes, work)
        print(json.dumps(record["evaluation"]), flush=True)
        record["meta_training"] = meta_training(devices, args.unrolls, args.learner_steps, work / "c_gpu", work)
    (out / "gpu.json").write_text(json.dumps(record, indent=1))
    (out / "gpu.md").write_text(report(record))
    print((out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
