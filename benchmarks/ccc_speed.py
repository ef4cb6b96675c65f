"""CCC stream speed: images/s of generating the `ccc` stream against Tent's adaptation images/s,
in one run, on the same cores (Fashion-MNIST test set, the cached ResNet-8 source model, batch 64).

Generation is timed over the first `--num-images` images of a fresh stream: that includes
corrupting the first two nodes and the nodes of every later transition started, so it is the
slow start, not the steady state (later transitions corrupt one new node per
`transition_images` images). Tent is timed on its forward + backward + step only (as
`metatta.evaluation.evaluate` times methods), on the first `--tent-images` images of the same
stream, held in memory. Each pass runs with the given torch thread count for both. Both as
wall-clock and as process-CPU images/s: on a shared machine the CPU figure is the steadier one.
Calibration (from the cache when present) is reported apart.

    python benchmarks/ccc_speed.py [--difficulty medium hard] [--num-images 50000] [--tent-images 1920]
                                   [--threads 1 2]

Writes benchmarks/results/ccc_speed.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from metatta.data.ccc import clean_domain, stream_summary
from metatta.data.clean import load_clean
from metatta.data.streams import build_stream
from metatta.methods import build_method
from metatta.models import load_source_model
from metatta.paths import models_dir

HERE = Path(__file__).resolve().parent


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(difficulty: str, model, images, labels, args) -> dict:
    def make():
        return build_stream([clean_domain(images, labels)], "ccc", args.batch_size, seed=args.seed, model=model,
                            difficulty=difficulty, num_images=args.num_images)

    stream, build_wall, build_cpu = timed(make)

    def generate():
        return sum(len(batch.y) for batch in stream)

    generated, gen_wall, gen_cpu = timed(generate)
    batches = [stream.batch(i) for i in range(min(len(stream), -(-args.tent_images // args.batch_size)))]
    tent = build_method("tent", copy.deepcopy(model), {}, batch_size=args.batch_size)
    tent(batches[0].x)  # warm-up batch, not timed
    wall = cpu = 0.0
    adapted = 0
    for batch in batches[1:]:
        _, w, c = timed(lambda: tent(batch.x))
        wall, cpu, adapted = wall + w, cpu + c, adapted + len(batch.y)
    row = {
        "difficulty": difficulty, "target_accuracy": stream.opts.target_accuracy,
        "transition_images": stream.opts.transition_images, "generated_images": generated,
        "generate_img_s": generated / gen_wall, "generate_img_cpu_s": generated / gen_cpu,
        "tent_images": adapted, "tent_img_s": adapted / wall, "tent_img_cpu_s": adapted / cpu,
        "stream_build_s": build_wall, "calibration_s": stream.calibration.seconds,
        "calibration_cpu_s": stream.calibration.cpu_seconds, "calibration_cached": stream.calibration.seconds == 0,
        "walk": stream_summary(stream, 4),
    }
    row["ratio_wall"] = row["generate_img_s"] / row["tent_img_s"]
    row["ratio_cpu"] = row["generate_img_cpu_s"] / row["tent_img_cpu_s"]
    print(json.dumps({k: v for k, v in row.items() if k != "walk"}), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difficulty", nargs="+", default=["medium", "hard"])
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--tent-images", type=int, default=1920)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=str(models_dir() / "resnet_fmnist.pt"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one pass each")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    model = load_source_model(args.checkpoint)
    images, labels = load_clean("fashion_mnist", "test")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows += [{"threads": threads, **measure(d, model, images, labels, args)} for d in args.difficulty]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ccc_speed.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    command = "python benchmarks/ccc_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"CCC stream generation vs Tent adaptation, batch {args.batch_size}, on this machine's 2 shared "
             f"cores. Command: `{command.strip()}`", "",
             "| threads | difficulty | target acc. | generated | gen img/s | Tent img/s | ratio | gen img/CPU-s | "
             "Tent img/CPU-s | ratio (CPU) | calibration s (CPU s) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        calibration = ("cached" if r["calibration_cached"]
                       else f"{r['calibration_s']:.0f} ({r['calibration_cpu_s']:.0f})")
        lines.append(f"| {r['threads']} | {r['difficulty']} | {r['target_accuracy']:.0f} | {r['generated_images']} | "
                     f"{r['generate_img_s']:.0f} | {r['tent_img_s']:.0f} | **{r['ratio_wall']:.1f}x** | "
                     f"{r['generate_img_cpu_s']:.0f} | {r['tent_img_cpu_s']:.0f} | {r['ratio_cpu']:.1f}x | "
                     f"{calibration} |")
    lines += ["", "Generation includes corrupting every node the first images need (the slow start); Tent is "
              "timed on its adaptation step only, on batches of the same stream."]
    (out / "ccc_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
