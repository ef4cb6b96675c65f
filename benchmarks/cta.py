"""CTA benchmark: CTA against joint-training TTT, Tent, BN and the source model.

Fashion-MNIST-C, 15 corruptions, severity 5, batch 200, reset per corruption
(`episodic` stream) and, inside a corruption, reset per batch (the methods'
`episodic: true` default, as TTT and CTA are evaluated). TTT and CTA before
adaptation (0 steps) and after 1, 5 and 20 test-time steps per batch; error
and seconds per batch. Ray Train scaling: the SimCLR stage on 1 and 2 workers
(samples per second, all workers together, measured inside the epoch).

The paper's claims it checks: (1) after alignment and before adaptation the
SSL encoder has lower corrupted-data error than the supervised encoder (CTA at
0 steps vs BN, the same supervised model with the same batch statistics);
(2) CTA beats TTT; (3) CTA's error stays stable as steps grow to 20.

Also the frozen classifier on the aligned SSL encoder and on the supervised
encoder with each BN mode ("batch": each test batch's statistics, as CTA and BN
predict; "source": each encoder's own running buffers, the supervised one being
the Source baseline), so that claim (1) can be read for every pairing.

Writes benchmarks/results/<--tag>.json and .md (default cta).

    python benchmarks/cta.py                                   # full: trains CTA and TTT first
    python benchmarks/cta.py --num-images 200 --epochs 1       # a short run
    python benchmarks/cta.py --train-images 10000 --cta-set simclr.epochs=20 align.epochs=10   # config overrides
    python benchmarks/cta.py --cta-adapter outputs/cta/cta_fmnist/adapter --ttt-adapter outputs/ttt/ttt_fmnist/adapter
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # trainers/ (the Ray layer) is not installed

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.data.benchmark_files import fashion_mnist_c, read_cifar_c
from metatta.data.domains import BENCHMARK_CORRUPTIONS
from metatta.experiment import MethodSpec, experiment_config, run_experiment
from metatta.reporting import benchmark_command, error_table
from metatta.source import source_checkpoint
from metatta.ssl.diagnostics import encoder_modes
from metatta.ssl.stages import cta_train_config, load_stage_state, stage_files
from metatta.ssl.training import stage_spec
from trainers.cta import fit_stage_on_ray, train_cta

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH = 200


def train(method: str, work: Path, epochs: int | None, train_images: int | None, extra: list[str] = ()) -> Path:
    """Train CTA or TTT with its config (registry off) and `extra` overrides; returns the adapter directory."""
    overrides = [f"checkpoint_dir={work}", "register_as=null", "mlflow=false", "progress=false"]
    if train_images:
        overrides.append(f"train_images={train_images}")
    if epochs:
        overrides += [f"{stage}.epochs={epochs}" for stage in (("simclr", "align") if method == "cta" else ("joint",))]
    overrides += list(extra)
    cfg = cta_train_config(load_config(ROOT / "configs" / "fmnist_c" / f"{method}.yaml", overrides))
    start = time.perf_counter()
    outcome = train_cta(cfg, use_ray=True)
    print(f"{method}: trained in {time.perf_counter() - start:.0f} s, held-out validation error "
          f"{outcome.validation_error:.2f}% ({outcome.unadapted_validation_error:.2f}% before adaptation)")
    return outcome.adapter_dir


def scaling(work: Path, images: int) -> list[dict]:
    """SimCLR-stage throughput of Ray Train with 1 and 2 workers, one epoch over `images` images."""
    rows = []
    for workers in (1, 2):
        cfg = cta_train_config(load_config(ROOT / "configs" / "fmnist_c" / "cta.yaml", [
            f"name=bench_scaling_w{workers}", f"num_workers={workers}", f"train_images={images}", "simclr.epochs=1",
            f"checkpoint_dir={work}", "mlflow=false", "progress=false"]))
        path = stage_files(cfg)["simclr"]
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        fit_stage_on_ray(stage_spec(cfg, source_checkpoint(cfg.source_checkpoint, cfg.source_config), stage="simclr"), cfg)
        (epoch,) = load_stage_state(path)["history"]
        rows.append({"workers": workers, "images": images, "samples_per_second": epoch["samples_per_second"],
                     "epoch_seconds": epoch["epoch_seconds"], "wall_seconds": time.perf_counter() - start})
    return rows


def method_rows(cta: Path, ttt: Path, steps: list[int]) -> list[MethodSpec]:
    rows = [MethodSpec("source"), MethodSpec("bn"), MethodSpec("tent")]
    for name, adapter in (("ttt", ttt), ("cta", cta)):
        rows += [MethodSpec(name, label=f"{name} ({k} steps)", adapter=str(adapter),
                            config={"steps": k, "episodic": True}) for k in steps]
    return rows


def write_report(out: Path, results, scale: list[dict], steps: list[int], args, command: list[str],
                 modes: dict[str, float] | None = None) -> dict:
    by = {r.method: r for r in results}
    batch = min(BATCH, args.num_images)
    seconds = {r.method: batch / r.images_per_second for r in results}
    cta_errors = [by[f"cta ({k} steps)"].mean_error for k in steps]
    claims = {
        "aligned_ssl_encoder_beats_supervised_before_adaptation":
            by["cta (0 steps)"].mean_error < by["bn"].mean_error if 0 in steps else None,
        "cta_beats_ttt": {k: by[f"cta ({k} steps)"].mean_error < by[f"ttt ({k} steps)"].mean_error for k in steps},
        "cta_error_range_over_steps": max(cta_errors) - min(cta_errors),
    }
    record = {"command": command, "protocol": results[0].protocol, "results": [r.to_dict() for r in results], "seconds_per_batch": seconds,
              "ray_train_scaling": scale, "claims": claims, "encoder_modes": modes}
    (out / f"{args.tag}.json").write_text(json.dumps(record, indent=1))
    lines = [f"Fashion-MNIST-C, 15 corruptions, severity 5, batch {batch}, reset per corruption and (TTT, CTA) per "
             f"batch, {args.num_images} images per corruption. Command: `python {' '.join(command)}`", "",
             "| method | mean error (%) | s per batch |", "|---|---:|---:|"]
    lines += [f"| {r.method} | {r.mean_error:.2f} | {seconds[r.method]:.3f} |" for r in results]
    lines += ["", "Per corruption:", "", error_table(results), ""]
    if len(scale) == 2:
        ratio = scale[1]["samples_per_second"] / scale[0]["samples_per_second"]
        lines += [f"Ray Train, SimCLR stage, {scale[0]['images']} images, batch 256 per worker: 1 worker "
                  f"{scale[0]['samples_per_second']:.0f} samples/s, 2 workers {scale[1]['samples_per_second']:.0f} "
                  f"({ratio:.2f}x), 2 CPU cores.", ""]
    lines += [f"Claims: aligned SSL encoder before adaptation beats the supervised one (CTA 0 steps < BN): "
              f"{claims['aligned_ssl_encoder_beats_supervised_before_adaptation']}; CTA beats TTT at "
              f"{', '.join(f'{k}: {v}' for k, v in claims['cta_beats_ttt'].items())} steps; CTA's error varies by "
              f"{claims['cta_error_range_over_steps']:.2f} points over {steps} steps.", ""]
    if modes:
        lines += ["Frozen classifier without adaptation, by BN statistics (batch: each test batch's; source: the "
                  "encoder's running buffers), mean error (%):", "",
                  "| encoder | batch statistics | source statistics |", "|---|---:|---:|",
                  f"| aligned SSL (CTA) | {modes['ssl_batch']:.2f} | {modes['ssl_source']:.2f} |",
                  f"| supervised (BN / Source) | {modes['sup_batch']:.2f} | {modes['sup_source']:.2f} |", ""]
    (out / f"{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every training stage (default: configs)")
    parser.add_argument("--train-images", type=int, default=None, help="clean training images (default: all)")
    parser.add_argument("--steps", nargs="*", type=int, default=[0, 1, 5, 20])
    parser.add_argument("--scaling-images", type=int, default=4096, help="images of the 1-vs-2-worker runs; 0: skip")
    parser.add_argument("--cta-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/fmnist_c/cta.yaml for training, e.g. simclr.epochs=20")
    parser.add_argument("--ttt-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/fmnist_c/ttt.yaml for training")
    parser.add_argument("--cta-adapter", help="a trained CTA adapter directory (skips training)")
    parser.add_argument("--ttt-adapter", help="a trained TTT adapter directory (skips training)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--tag", default="cta", help="result files <out>/<tag>.json and .md")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench_cta"), help="training checkpoints and runs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging("WARNING")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    scale = scaling(work, args.scaling_images) if args.scaling_images else []
    cta = Path(args.cta_adapter) if args.cta_adapter else train("cta", work, args.epochs, args.train_images,
                                                                args.cta_set)
    ttt = Path(args.ttt_adapter) if args.ttt_adapter else train("ttt", work, args.epochs, args.train_images,
                                                                args.ttt_set)
    ray.shutdown()

    cfg = experiment_config(load_config(ROOT / "configs" / "fmnist_c" / "cta_eval.yaml", [
        f"benchmark.num_images={args.num_images}", "progress=false", "mlflow=false", "name=bench_cta",
        f"output_dir={work / 'runs'}", f"stream.batch_size={min(BATCH, args.num_images)}"]))
    cfg.methods = method_rows(cta, ttt, args.steps)
    results = run_experiment(cfg)
    root = fashion_mnist_c(corruptions=BENCHMARK_CORRUPTIONS)
    modes = encoder_modes(cta, read_cifar_c(root, BENCHMARK_CORRUPTIONS, [5], num_images=args.num_images))
    write_report(out, results, scale, args.steps, args, benchmark_command(__file__, argv), modes)


if __name__ == "__main__":
    main(sys.argv[1:])
