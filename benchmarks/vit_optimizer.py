"""On the LayerNorm ViT, is MGTTA's gain its loss or its learned optimizer?

MGTTA's ViT loss (entropy + 0.4 x the CLS-token mean/std alignment after every block; the loss the MGG
was meta-trained with, from its adapter.json) stepped on the same parameters (every LayerNorm affine) by hand-made optimizers — SGD with momentum 0.9 and Adam at
several lrs — and by the MGG meta-trained for this ViT, on the ViT benchmark's stream
(Fashion-MNIST-C, 15 corruptions at severity 5, batch 64, episodic and continual). Rows with plain
SGD/Adam are MGTTA with an explicit optimizer in place of the MGG (`optimizer_factory`). Each row is
also scored on the MGG's own held-out validation (where the MGG's lr was chosen), so a hand-made
optimizer's lr can be chosen the same way, without the benchmark.

    python benchmarks/vit_optimizer.py --mgg models:/mgg_vit@champion [--num-images 1000]

Writes benchmarks/results/vit_optimizer[_n<images>].{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from metatta import tracking
from metatta.cli import setup_logging
from metatta.data.streams import build_stream
from metatta.evaluation import evaluate
from metatta.experiment import BenchmarkConfig, SourceConfig, load_domains, source_model
from metatta.learned.meta_training import mgg_train_config, mgtta_config, split_domains, training_domains
from metatta.learned.mgg import load_mgg
from metatta.methods.base import build_method
from metatta.models.checkpoint import load_feature_stats
from metatta.reporting import benchmark_command, markdown_table
from metatta.training import method_error

HERE = Path(__file__).resolve().parent
SOURCE_CONFIG = HERE.parent / "configs" / "fmnist_c" / "source_vit.yaml"
SETTINGS = ("episodic", "continual")
SGD_LRS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
ADAM_LRS = (1e-4, 1e-3, 1e-2, 3e-2)
MOMENTUM = 0.9


def optimizer_rows(mgg_lr: float) -> dict[str, tuple[float, object]]:
    """label -> (lr, optimizer factory or None for the MGG)."""
    rows = {f"MGG (lr {mgg_lr:g})": (mgg_lr, None)}
    rows.update({f"SGD lr {lr:g}": (lr, lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=MOMENTUM))
                 for lr in SGD_LRS})
    rows.update({f"Adam lr {lr:g}": (lr, lambda p, lr=lr: torch.optim.Adam(p, lr=lr)) for lr in ADAM_LRS})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mgg", required=True, help="the ViT's MGG: models:/mgg_vit@champion or an adapter directory")
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    device = torch.device("cpu")
    model, checkpoint = source_model(SourceConfig(config=str(SOURCE_CONFIG)), device)
    stats = load_feature_stats(checkpoint, device=device)
    adapter = tracking.adapter_directory(args.mgg)
    train = tracking.adapter_info(adapter).get("train_config")
    if not train:
        raise SystemExit(f"{args.mgg}: its adapter.json has no train_config (needed for the held-out validation)")
    train_cfg = mgg_train_config(train)
    as_trained = mgtta_config(train_cfg)
    mgg_lr = float(as_trained["lr"])
    mgg = load_mgg(adapter)
    domains = load_domains(BenchmarkConfig(num_images=args.num_images))
    # the MGG's own validation domains: held-out corruptions of clean training images, never a test image
    _, val_domains = split_domains(training_domains(train_cfg)[0], train_cfg)
    results: dict[str, dict[str, dict]] = {}
    for label, (lr, factory) in optimizer_rows(mgg_lr).items():
        torch.manual_seed(0)
        error = method_error("mgtta", copy.deepcopy(model), {**as_trained, "lr": lr}, val_domains,
                             train_cfg.val_batch_size, train_cfg.seed, device, optimizer_factory=factory, mgg=mgg,
                             source_stats=stats)
        results[label] = {"held_out": {"mean_error": error}}
        print(f"held-out  {label:18s} {error:.2f}", flush=True)
    for setting in SETTINGS:
        for label, (lr, factory) in optimizer_rows(mgg_lr).items():
            torch.manual_seed(0)
            method = build_method("mgtta", copy.deepcopy(model), {**as_trained, "lr": lr},
                                  optimizer_factory=factory, batch_size=args.batch_size, mgg=mgg, source_stats=stats)
            result = evaluate(method, build_stream(domains, setting, args.batch_size, seed=0), method_name=label,
                              progress=False)
            results.setdefault(label, {})[setting] = {"mean_error": result.mean_error,
                                                      "images_per_second": result.images_per_second,
                                                      "domain_errors": result.domain_errors}
            print(f"{setting:9s} {label:18s} {result.mean_error:.2f}", flush=True)
    write(args, argv, results)


def write(args, argv, results: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "vit_optimizer" if args.num_images == 1000 else f"vit_optimizer_n{args.num_images}"
    command = benchmark_command(__file__, argv)
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "num_images": args.num_images,
                                                  "results": results}, indent=1))
    columns = ("held_out", *SETTINGS)
    best = {s: min(r[s]["mean_error"] for r in results.values()) for s in columns}
    rows = [[label] + [(f"**{r[s]['mean_error']:.2f}**" if r[s]["mean_error"] == best[s] else f"{r[s]['mean_error']:.2f}")
                       for s in columns] for label, r in results.items()]
    (out / f"{stem}.md").write_text(
        f"MGTTA's ViT loss (entropy + 0.4 x CLS statistics) on the LayerNorm affines of the ViT source, stepped "
        f"by the MGG or by SGD (momentum {MOMENTUM}) / Adam; Fashion-MNIST-C, 15 corruptions at severity 5, "
        f"{args.num_images} images each, batch {args.batch_size}; mean error (%). `held_out`: the MGG's validation "
        f"(its 4 held-out corruptions of clean training images, episodic), where a user would choose an lr. "
        f"Command: `python {' '.join(command)}`\n\n"
        + markdown_table(["optimizer", *columns], rows) + "\n")
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
