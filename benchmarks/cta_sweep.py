"""CTA design sweep on the held-out corruptions: why is the aligned encoder bad, what helps.

One SimCLR encoder is trained (in this process, one worker, on the first
`--train-images` clean training images); every variant then runs its own
alignment from that encoder (`name key=value ...`: overrides of
configs/fmnist_c/cta.yaml, e.g. `align.feature_weight=1`, `align.temperature=0.1`,
`method_config.lr=1e-3`) and is measured on the four held-out corruptions
(speckle_noise, gaussian_blur, spatter, saturate; severity 5; never the fifteen
reported ones) and on clean test images:

- error of the frozen classifier on the aligned SSL encoder (batch statistics,
  as CTA predicts) against the supervised encoder with batch statistics (BN);
- agreement of the two encoders' pooled features: cosine, retrieval, and the
  ratio of mean feature norms (SSL / supervised), and the mean confidence;
- CTA's held-out error after `--steps` test-time SimCLR steps per batch (reset
  per batch, as benchmarks/cta.py evaluates it), at each `--lrs` lr.

The diagnostics are `metatta.ssl.diagnostics`. Writes benchmarks/results/<--tag>.json and .md
(the command included).

    python benchmarks/cta_sweep.py --train-images 10000 --simclr-epochs 10 \\
        --variant paper --variant fm1 align.feature_weight=1 --variant t01 align.temperature=0.1
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.models import load_source_model
from metatta.models.checkpoint import checkpoint_hash
from metatta.reporting import benchmark_command
from metatta.source import load_clean_split, source_checkpoint
from metatta.ssl.diagnostics import domains_diagnostics, encoder_diagnostics
from metatta.ssl.networks import split_classifier
from metatta.ssl.stages import cta_train_config, load_stage_state, stage_complete, stage_files
from metatta.ssl.training import (run_stage, save_adapter, stage_spec, trained_network, validation_domains,
                                  validation_error)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def base_config(args, name: str, overrides: list[str]):
    return cta_train_config(load_config(ROOT / "configs" / "fmnist_c" / "cta.yaml", [
        f"name={name}", f"checkpoint_dir={args.work}", "mlflow=false", "register_as=null", "progress=false",
        f"train_images={args.train_images}", f"simclr.epochs={args.simclr_epochs}",
        f"val_images={args.val_images}", *overrides]))


def train_stage(cfg, stage: str, checkpoint: str) -> list[dict]:
    """One stage in this process (one worker); skipped when its checkpoint is complete."""
    path = stage_files(cfg)[stage]
    if not stage_complete(path, getattr(cfg, stage).epochs):
        path.unlink(missing_ok=True)
        run_stage(stage_spec(cfg, checkpoint, stage=stage))
    return load_stage_state(path)["history"]


def export_adapter(net, cfg, checkpoint: str) -> Path:
    """The variant's network as an adapter directory (`<work>/<name>/adapter`), usable with
    `benchmarks/cta.py --cta-adapter` and `launch/evaluate.py --adapter`."""
    return save_adapter(net, cfg, checkpoint, checkpoint_hash(checkpoint), trained_by="benchmarks/cta_sweep.py")


def run_variant(args, name: str, overrides: list[str], checkpoint: str, simclr_file: Path, data) -> dict:
    cfg = base_config(args, name, overrides)
    files = stage_files(cfg)
    if not files["simclr"].is_file() or files["simclr"].read_bytes() != simclr_file.read_bytes():
        files["simclr"].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(simclr_file, files["simclr"])
        files["align"].unlink(missing_ok=True)
    start = time.perf_counter()
    history = train_stage(cfg, "align", checkpoint)
    train_s = time.perf_counter() - start
    net = trained_network(cfg, checkpoint, files)
    adapter = export_adapter(net, cfg, checkpoint)
    supervised = split_classifier(load_source_model(checkpoint))[0]
    clean_x, clean_y = data["clean"]
    row = {"name": name, "overrides": overrides, "adapter": str(adapter), "align_seconds": train_s, "align_last_epoch": history[-1],
           "clean": encoder_diagnostics(net, supervised, clean_x, clean_y),
           "held_out": domains_diagnostics(net, supervised, data["held_out"]), "cta": {}}
    # The scale question apart from the directions: the SSL features rescaled by one scalar, label-free,
    # fitted on the clean images (mean supervised norm over mean SSL norm), then read on held-out data.
    row["rescale"] = 1 / row["clean"]["norm_ratio"]
    row["held_out_rescaled"] = domains_diagnostics(net, supervised, data["held_out"], row["rescale"])
    # Both encoders on their own running BN statistics: the supervised one is then the Source baseline.
    row["clean_source_stats"] = encoder_diagnostics(net, supervised, clean_x, clean_y, statistics="source")
    row["held_out_source_stats"] = domains_diagnostics(net, supervised, data["held_out"], statistics="source")
    for i, lr in enumerate(args.lrs):
        for steps in args.steps:
            if steps == 0 and i > 0:
                continue  # without steps the lr does not matter: measured once
            cfg.method_config = {**cfg.method_config, "lr": lr, "episodic": True}
            start = time.perf_counter()
            error = validation_error(net, cfg, data["held_out"], steps=steps)
            key = "0 steps" if steps == 0 else f"lr {lr:g}, {steps} steps"
            row["cta"][key] = {"error": error, "seconds": time.perf_counter() - start}
    print(json.dumps(row, indent=1, default=float), flush=True)
    return row


def write_report(out: Path, tag: str, record: dict) -> None:
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1, default=float))
    lines = [f"CTA sweep, held-out corruptions (severity 5, {record['val_images']} images each) and "
             f"{record['clean_images']} clean test images. Command: `python {' '.join(record['command'])}`", "",
             f"SimCLR: {record['simclr_epochs']} epochs on {record['train_images']} images "
             f"({record['simclr_seconds']:.0f} s, last loss {record['simclr_last_epoch']['loss']:.3f}).", "",
             "Frozen classifier on each encoder with batch statistics (sup = the supervised encoder, i.e. BN):", "",
             "| variant | overrides | held-out err SSL / sup | clean err SSL / sup | cosine | norm ratio | "
             "held-out conf. SSL / sup | held-out err SSL rescaled (x scale) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["variants"]:
        h, c = r["held_out"], r["clean"]
        lines.append(f"| {r['name']} | {' '.join(r['overrides']) or '-'} | {h['ssl_error']:.2f} / {h['sup_error']:.2f} | "
                     f"{c['ssl_error']:.2f} / {c['sup_error']:.2f} | {h['cosine']:.3f} | {h['norm_ratio']:.2f} | "
                     f"{h['ssl_confidence']:.1f} / {h['sup_confidence']:.1f} | "
                     f"{r['held_out_rescaled']['ssl_error']:.2f} (x{r['rescale']:.2f}) |")
    lines += ["", "Error (%) of the frozen classifier by BN statistics (batch: each test batch's, as CTA and BN; "
              "source: each encoder's running buffers from training, the supervised one = Source):", "",
              "| variant | held-out SSL batch | held-out SSL source | held-out sup batch (BN) | held-out sup source "
              "(Source) | clean SSL batch / source | clean sup batch / source |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["variants"]:
        if "held_out_source_stats" not in r:
            continue
        h, hs, c, cs = r["held_out"], r["held_out_source_stats"], r["clean"], r["clean_source_stats"]
        lines.append(f"| {r['name']} | {h['ssl_error']:.2f} | {hs['ssl_error']:.2f} | {h['sup_error']:.2f} | "
                     f"{hs['sup_error']:.2f} | {c['ssl_error']:.2f} / {cs['ssl_error']:.2f} | "
                     f"{c['sup_error']:.2f} / {cs['sup_error']:.2f} |")
    keys = list(dict.fromkeys(k for r in record["variants"] for k in r["cta"]))
    lines += ["", "CTA held-out mean error (%), reset per batch:", "", "| variant | " + " | ".join(keys) + " |",
              "|---|" + "---:|" * len(keys)]
    for r in record["variants"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['cta'][k]['error']:.2f}" if k in r["cta"] else "-"
                                                        for k in keys) + " |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def parse_variants(raw: list[list[str]]) -> list[tuple[str, list[str]]]:
    variants = [(v[0], v[1:]) for v in raw] or [("paper", [])]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must differ, got {names}")
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--simclr-epochs", type=int, default=10)
    parser.add_argument("--val-images", type=int, default=400, help="per held-out corruption")
    parser.add_argument("--clean-images", type=int, default=2000, help="clean test images")
    parser.add_argument("--steps", nargs="*", type=int, default=[0, 5, 20])
    parser.add_argument("--lrs", nargs="*", type=float, default=[1e-4])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="cta_sweep")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "cta_sweep"))
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    variants = parse_variants(args.variant)
    cfg = base_config(args, f"simclr_n{args.train_images}_e{args.simclr_epochs}", [])
    checkpoint = str(source_checkpoint(cfg.source_checkpoint, cfg.source_config))
    start = time.perf_counter()
    simclr_history = train_stage(cfg, "simclr", checkpoint)
    simclr_s = time.perf_counter() - start
    clean = load_clean_split("fashion_mnist", "test")
    data = {"clean": (clean[0][:args.clean_images], clean[1][:args.clean_images]), "held_out": validation_domains(cfg)}
    record = {"command": benchmark_command(__file__, argv), "train_images": args.train_images,
              "simclr_epochs": args.simclr_epochs, "simclr_seconds": simclr_s, "simclr_last_epoch": simclr_history[-1],
              "val_images": args.val_images, "clean_images": args.clean_images, "variants": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in variants:
        record["variants"].append(run_variant(args, name, overrides, checkpoint, stage_files(cfg)["simclr"], data))
        write_report(out, args.tag, record)


if __name__ == "__main__":
    main(sys.argv[1:])
