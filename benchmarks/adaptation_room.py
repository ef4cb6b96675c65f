"""How much room does the MGTTA benchmark leave an optimizer of the norm affines? Labelled oracles.

MGTTA, Tent, SAR and EATA all adapt the same parameters: the affine weight and bias of
the BN layers, BN on test-batch statistics. This measures, on the stream of the MGTTA
benchmark (Fashion-MNIST-C, 15 corruptions, severity 5, batch 64, episodic: reset per
corruption), what *labels* could get out of those parameters:

- `bn`: no update (every method's starting point);
- `online oracle, lr L`: predict a batch, then one Adam step on its cross-entropy with the
  true labels (the feedback a label-free method only estimates), in stream order; the
  best over `--lrs` is the reference for "an optimizer that knew the answer";
- `in-sample floor`: Adam on the cross-entropy of all the corruption's images, with their
  labels, for `--floor-epochs` epochs, then predict them: the lowest error the norm
  affines can reach on these very images (fitted on them, so no method can go below it).

- `gradient agreement`: at the unadapted (BN) state of every batch, the cosine between the
  gradient of a label-free loss (mean entropy: Tent's and the MGG's input; EATA's weighted entropy
  of its reliable samples; on a ViT also MGTTA's ViT loss `entropy+stats` and its CLS-statistics
  term `stats` alone) and that of the labelled cross-entropy, over all norm affines, and the share of coordinates where their
  signs agree: what a per-coordinate optimizer (the MGG sees one coordinate's gradient
  history at a time) has to turn into the oracle's step.

The gap BN -> online oracle is what a perfect feedback signal makes of these parameters in
this protocol; the agreement says how much of that signal the entropy gradient carries. Writes benchmarks/results/<--tag>.{json,md}.
The analysis itself is `metatta.adaptation_room`.

`--source-config configs/fmnist_c/source_vit.yaml` runs it on the LayerNorm ViT: the parameters are
then its LayerNorm affines, and the unadapted row is the source model itself (`source`: no BN
statistics to re-estimate); results go to adaptation_room_vit[_n<images>].

    python benchmarks/adaptation_room.py [--num-images 1000] [--lrs 1e-3 1e-2 3e-2] [--source-config ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metatta.adaptation_room import floor_errors, gradient_agreement, online_errors
from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.data.streams import build_stream
from metatta.experiment import experiment_config, load_domains, source_model
from metatta.methods.common import BN_TYPES
from metatta.models.checkpoint import load_feature_stats
from metatta.models.feature_stats import is_vision_transformer
from metatta.reporting import benchmark_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (<= 10000)")
    parser.add_argument("--lrs", nargs="*", type=float, default=[1e-3, 1e-2, 3e-2], help="online oracle Adam lrs")
    parser.add_argument("--floor-epochs", type=int, default=20, help="0: skip the in-sample floor")
    parser.add_argument("--floor-lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--source-config", default=None,
                        help="another source model (e.g. configs/fmnist_c/source_vit.yaml); default: the MGTTA "
                             "benchmark's ResNet")
    parser.add_argument("--tag", default=None,
                        help="result name (default: adaptation_room[_<source config stem minus source_>][_n<images>])")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def default_tag(source_config: str | None, num_images: int) -> str:
    """adaptation_room for the MGTTA benchmark's ResNet; adaptation_room_vit for source_vit.yaml; _n<images>
    unless 1,000 images per corruption."""
    tag = "adaptation_room"
    if source_config:
        stem = Path(source_config).stem
        tag += "_" + (stem[len("source_"):] if stem.startswith("source_") else stem)
    return tag if num_images == 1000 else f"{tag}_n{num_images}"


def main(argv=None):
    args = parse_args(argv)
    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    overrides = [f"benchmark.num_images={args.num_images}"]
    if args.source_config:
        overrides.append(f"source.config={args.source_config}")
    data = load_config(ROOT / "configs" / "fmnist_c" / "mgtta.yaml", overrides)
    cfg = experiment_config(data)
    domains = load_domains(cfg.benchmark)
    model, checkpoint = source_model(cfg.source, torch.device("cpu"))
    stream = build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=cfg.stream.seed)
    if not stream.resets_per_domain:
        raise ValueError("the oracles reset per corruption: the stream must be episodic")

    # the unadapted row: BN on batch statistics for a BN network, the source model itself for a ViT
    start_label = "bn" if any(isinstance(m, BN_TYPES) for m in model.modules()) else "source"
    rows, seconds = {}, {}
    for label, lr in [(start_label, None)] + [(f"online oracle, lr {lr:g}", lr) for lr in args.lrs]:
        start = time.perf_counter()
        rows[label] = online_errors(model, stream, lr)
        seconds[label] = time.perf_counter() - start
    if args.floor_epochs:
        label = f"in-sample floor ({args.floor_epochs} epochs, lr {args.floor_lr:g})"
        start = time.perf_counter()
        rows[label] = floor_errors(model, stream, args.floor_epochs, args.floor_lr, cfg.stream.seed)
        seconds[label] = time.perf_counter() - start

    # MGTTA's ViT loss reads the clean CLS statistics stored with a ViT source: its gradient is compared too
    stats = load_feature_stats(checkpoint) if is_vision_transformer(model) else None
    agreement = gradient_agreement(model, stream, source_stats=stats)
    means = {k: float(np.mean(list(v.values()))) for k, v in rows.items()}
    online = [k for k in rows if k.startswith("online")]
    best_online = min(online, key=means.get) if online else None
    tag = args.tag or default_tag(args.source_config, args.num_images)
    command = benchmark_command(__file__, argv)
    record = {"command": command, "num_images": args.num_images, "batch_size": cfg.stream.batch_size,
              "setting": cfg.stream.setting, "source_checkpoint": str(checkpoint), "errors": rows, "mean_error": means,
              "seconds": seconds, "best_online_oracle": best_online, "gradient_agreement": agreement,
              "unadapted_row": start_label,
              "room_bn_to_online_oracle": means[start_label] - means[best_online] if best_online else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1))
    names = list(next(iter(rows.values())))
    adapted = "norm affines on batch statistics" if start_label == "bn" else "LayerNorm affines"
    lines = [f"Fashion-MNIST-C, severity 5, batch {cfg.stream.batch_size}, episodic, {args.num_images} images per "
             f"corruption; {adapted}. Source: {checkpoint.name}. Command: `python {' '.join(command)}`", "",
             "| row | " + " | ".join(n[:6] for n in names) + " | mean | seconds |",
             "|---|" + "---:|" * (len(names) + 2)]
    lines += [f"| {k} | " + " | ".join(f"{v[n]:.1f}" for n in names) + f" | {means[k]:.2f} | {seconds[k]:.0f} |"
              for k, v in rows.items()]
    for loss, by_domain in agreement.items():
        cosine = [by_domain[n]["cosine"] if n in by_domain else float("nan") for n in names]
        signs = [by_domain[n]["sign_agreement"] if n in by_domain else float("nan") for n in names]
        lines += [f"| grad. cosine, {loss} vs CE | " + " | ".join(f"{c:.2f}" for c in cosine)
                  + f" | {np.nanmean(cosine):.2f} | |",
                  f"| grad. sign agreement, {loss} vs CE | " + " | ".join(f"{a:.2f}" for a in signs)
                  + f" | {np.nanmean(signs):.2f} | |"]
    if best_online:
        lines += ["", f"Room an optimizer could use with perfect feedback: {start_label} {means[start_label]:.2f} -> "
                      f"best online oracle "
                      f"{means[best_online]:.2f} ({best_online}): {record['room_bn_to_online_oracle']:.2f} points."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
