"""AdaContrast: metatta's implementation against the broadest public TTA codebase's on the
project's stream.

Runs `AdaContrast` of mariodoebler/test-time-adaptation (classification/methods/adacontrast.py
with its base class methods/base.py and utils/misc.py, utils/registry.py, imported unmodified
from a checkout of its `classification` folder given with `--reference-repo`) and
`metatta.methods.adacontrast` side by side on the Fashion-MNIST-C stream with the project's
source ResNet: continual over the corruptions at severity 5, `--num-images` per corruption,
batch `--batch-size`, both with their CIFAR-10-C settings (SGD lr 2e-4, Nesterov momentum 0.9,
weight decay 1e-4, queue 16,384, m 0.999, T 0.07, kNN 10 after 1,024 images), the lr not
scaled to the batch (theirs is not).

What is not theirs here: their `models.model` module (it needs open_clip and robustbench) is
replaced by a stand-in whose `BaseModel` returns (the classifier's input, the logits) of the
given network, which is what theirs does after splitting a network into encoder and `fc`; and
the views. Their views come from PIL transforms in their data loader; here both
implementations get the same views of each batch (metatta's `weak_view` and `strong_view`,
drawn once from the batch's seed; `AdaContrast.views` is replaced for ours), so that what is
compared is the method, deterministically. The random initial queue is drawn from the same seed
in both. Per corruption: both errors, the predictions that differ, the largest parameter
difference; and both speeds (views excluded for both; the two alternate which goes first).
Writes benchmarks/results/<--tag>.{json,md}.

`--episodic`: both reset at every corruption (the project's episodic setting). Their `reset()`
builds a new AdaMoCo, which draws a new random queue; metatta's restores the one drawn at
construction (its reset restores the initial state bit for bit). Both are a random initial
queue; so that the comparison stays deterministic the harness gives theirs metatta's queue after
each reset (their features and labels, nothing else).

    git --git-dir=<mirror of mariodoebler/test-time-adaptation> archive HEAD classification | tar -x -C /tmp/tta
    python benchmarks/fidelity_adacontrast.py --reference-repo /tmp/tta/classification [--num-images 1000] \
        [--batch-size 64 --episodic]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metatta.data.benchmark_files import read_cifar_c
from metatta.methods import build_method
from metatta.methods.adacontrast import strong_view, weak_view
from metatta.methods.common import classifier_layer, features_and_logits
from metatta.models import load_source_model
from metatta.paths import cache_root
from metatta.reporting import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast")


class BaseModel(nn.Module):
    """Stand-in for their models.model.BaseModel: forward(x, return_feats) -> (features, logits)."""

    def __init__(self, model: nn.Module, arch_name: str = "", dataset_name: str = ""):
        super().__init__()
        self.model = model
        _, self.fc = classifier_layer(model)

    def forward(self, x: torch.Tensor, return_feats: bool = False):
        features, logits = features_and_logits(self.model, self.fc, x)
        return (features, logits) if return_feats else logits

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def output_dim(self) -> int:
        return self.fc.in_features


def _load(name: str, path: Path) -> types.ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"--reference-repo: no {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_module(repo: Path) -> types.ModuleType:
    """Their methods/adacontrast.py with the modules it imports (models.model: the stand-in)."""
    for package in ("models", "utils", "methods"):
        module = types.ModuleType(package)
        module.__path__ = [str(repo / package)]
        sys.modules[package] = module
    stand_in = types.ModuleType("models.model")
    stand_in.BaseModel = BaseModel
    stand_in.ResNetDomainNet126 = type("ResNetDomainNet126", (nn.Module,), {})
    sys.modules["models.model"] = stand_in
    _load("utils.registry", repo / "utils" / "registry.py")
    _load("utils.misc", repo / "utils" / "misc.py")
    _load("methods.base", repo / "methods" / "base.py")
    return _load("methods.adacontrast", repo / "methods" / "adacontrast.py")


def reference_config(batch_size: int) -> types.SimpleNamespace:
    """Their cfgs/cifar10_c/adacontrast.yaml over conf.py, as attribute namespaces."""
    ns = types.SimpleNamespace
    return ns(
        MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ARCH="metatta_resnet"),
        CORRUPTION=ns(DATASET="cifar10_c"),
        OPTIM=ns(STEPS=1, METHOD="SGD", LR=2e-4, MOMENTUM=0.9, DAMPENING=0.0, WD=1e-4, NESTEROV=True, BETA=0.9),
        TEST=ns(WINDOW_LENGTH=1, BATCH_SIZE=batch_size), MIXED_PRECISION=False,
        M_TEACHER=ns(MOMENTUM=0.999), CONTRAST=ns(TEMPERATURE=0.07),
        ADACONTRAST=ns(QUEUE_SIZE=16384, CONTRAST_TYPE="class_aware", CE_TYPE="standard", ALPHA=1.0, BETA=1.0,
                       ETA=1.0, DIST_TYPE="cosine", CE_SUP_TYPE="weak_strong", REFINE_METHOD="nearest_neighbors",
                       NUM_NEIGHBORS=10),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", type=Path, required=True, help="their `classification` folder")
    parser.add_argument("--benchmark-root", type=Path, default=cache_root() / "fashion_mnist_c-n10000-s0-v2")
    parser.add_argument("--checkpoint", type=Path, default=cache_root() / "models" / "resnet_fmnist.pt")
    parser.add_argument("--corruptions", nargs="+", default=list(DEFAULT_CORRUPTIONS))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--episodic", action="store_true", help="reset both at every corruption")
    parser.add_argument("--tag", default="fidelity_adacontrast")
    args = parser.parse_args(argv)

    ref = reference_module(args.reference_repo)
    source = load_source_model(args.checkpoint)
    num_classes = classifier_layer(source)[1].out_features
    torch.manual_seed(0)  # the random initial queue, drawn alike by both constructors
    ours = build_method("adacontrast", copy.deepcopy(source), {"channels_last": False, "scale_lr": False})
    torch.manual_seed(0)
    theirs = ref.AdaContrast(reference_config(args.batch_size), copy.deepcopy(source), num_classes)
    if not torch.equal(ours.queue, theirs.model.mem_feat.t()):
        raise RuntimeError("the initial queues differ: the constructors drew different random numbers")
    ours_params = [p for g in ours.optimizer.param_groups for p in g["params"]]
    if [tuple(p.shape) for p in ours_params] != [tuple(p.shape) for p in theirs.params]:
        raise RuntimeError("the two implementations adapt different parameters")
    rows, seconds, step, images = [], {"metatta": 0.0, "reference": 0.0}, 0, 0
    for index, domain in enumerate(read_cifar_c(args.benchmark_root, args.corruptions, [5], num_images=args.num_images)):
        if args.episodic and index > 0:
            ours.reset()
            theirs.reset()
            theirs.model.mem_feat = ours.queue.t().clone()  # their reset drew a new random queue (docstring)
            theirs.model.mem_labels = ours.queue_labels.clone()
        x_all = torch.from_numpy(np.array(domain.images)).permute(0, 3, 1, 2).float().div(255)
        y_all = torch.from_numpy(domain.labels).long()
        images += len(y_all)
        wrong, differ = {"metatta": 0, "reference": 0}, 0
        for i in range(0, len(x_all), args.batch_size):
            x, y = x_all[i:i + args.batch_size], y_all[i:i + args.batch_size]
            torch.manual_seed(step)
            views = (weak_view(x), strong_view(x), strong_view(x))
            ours.views = lambda _x, views=views: views
            sides = [("metatta", lambda: ours(x)), ("reference", lambda: theirs([x, *views]))]
            out = {}
            for side, run in (sides if step % 2 == 0 else sides[::-1]):  # alternate who goes first
                start = time.perf_counter()
                out[side] = run()
                seconds[side] += time.perf_counter() - start
            a, b = out["metatta"], out["reference"]
            step += 1
            wrong["metatta"] += int((a.argmax(1) != y).sum())
            wrong["reference"] += int((b.argmax(1) != y).sum())
            differ += int((a.argmax(1) != b.argmax(1)).sum())
        gap = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(ours_params, theirs.params))
        rows.append({"domain": domain.name, "error_metatta": 100 * wrong["metatta"] / len(y_all),
                     "error_reference": 100 * wrong["reference"] / len(y_all), "predictions_differing": differ,
                     "max_param_difference": gap})
        print(rows[-1], flush=True)
    record = {"protocol": vars(args) | {"reference_repo": str(args.reference_repo),
                                        "benchmark_root": str(args.benchmark_root), "checkpoint": str(args.checkpoint)},
              "rows": rows, "images_per_second": {k: images / v for k, v in seconds.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=1, default=str))
    table = markdown_table(["corruption", "metatta", "reference", "predictions differing", "max param difference"],
                           [[r["domain"], f"{r['error_metatta']:.1f}", f"{r['error_reference']:.1f}",
                             r["predictions_differing"], f"{r['max_param_difference']:.1e}"] for r in rows])
    speed = ", ".join(f"{k} {v:.0f} img/s" for k, v in record["images_per_second"].items())
    (RESULTS / f"{args.tag}.md").write_text(f"{table}\n\nSpeed (same process, same CPU, views excluded): {speed}\n")
    return record


if __name__ == "__main__":
    main()
