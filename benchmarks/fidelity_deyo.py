"""DeYO: metatta's implementation against the authors' code on the project's stream.

Runs the authors' `forward_and_adapt_deyo`, `configure_model` and `collect_params`
(Jhyun17/DeYO methods/deyo.py, imported unmodified from a checkout given with
`--authors-repo`; it needs `einops`) and `metatta.methods.deyo` side by side on the
Fashion-MNIST-C stream with the project's source ResNet: continual over the corruptions
at severity 5, `--num-images` per corruption, batch `--batch-size`, both with their
ResNet settings (SGD lr 0.00025, momentum 0.9, entropy filter 0.5 ln C, weight margin
0.4 ln C, PLPD 0.2, 4x4 patches). Their `layer4` rule names no layer of this ResNet, so
both adapt every BN affine (`excluded_modules: []` on ours). Each batch draws the same
random numbers in both (the seed is set before each). Per corruption: both errors, the
predictions that differ, the largest parameter difference; and both speeds. Writes
benchmarks/results/<--tag>.{json,md}.

    python benchmarks/fidelity_deyo.py --authors-repo /path/to/DeYO [--num-images 1000]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import time
import types
from pathlib import Path

import numpy as np
import torch

from metatta.data.benchmark_files import read_cifar_c
from metatta.data.domains import BENCHMARK_CORRUPTIONS
from metatta.methods import build_method
from metatta.models import load_source_model
from metatta.paths import cache_root
from metatta.reporting import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def authors_module(repo: Path) -> types.ModuleType:
    path = repo / "methods" / "deyo.py"
    if not path.is_file():
        raise FileNotFoundError(f"--authors-repo: no methods/deyo.py under {repo}")
    spec = importlib.util.spec_from_file_location("deyo_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-repo", type=Path, required=True)
    parser.add_argument("--benchmark-root", type=Path, default=cache_root() / "fashion_mnist_c-n10000-s0-v2")
    parser.add_argument("--checkpoint", type=Path, default=cache_root() / "models" / "resnet_fmnist.pt")
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tag", default="fidelity_deyo")
    args = parser.parse_args(argv)

    ref = authors_module(args.authors_repo)
    source = load_source_model(args.checkpoint)
    ours = build_method("deyo", copy.deepcopy(source), {"lr": 0.00025, "excluded_modules": [], "channels_last": False})
    theirs = ref.configure_model(copy.deepcopy(source))
    params, _ = ref.collect_params(theirs)
    optimizer = torch.optim.SGD(params, 0.00025, momentum=0.9)
    options = types.SimpleNamespace(filter_ent=1, filter_plpd=1, reweight_ent=1, reweight_plpd=1, aug_type="patch",
                                    patch_len=4, plpd_threshold=0.2)
    ours_params = [p for g in ours.optimizer.param_groups for p in g["params"]]
    if [tuple(p.shape) for p in ours_params] != [tuple(p.shape) for p in params]:
        raise RuntimeError("the two implementations adapt different parameters")
    margin, margin_e0 = 0.5 * math.log(10), 0.4 * math.log(10)
    rows, seconds, step, images = [], {"metatta": 0.0, "authors": 0.0}, 0, 0
    for domain in read_cifar_c(args.benchmark_root, args.corruptions, [5], num_images=args.num_images):
        x_all = torch.from_numpy(np.array(domain.images)).permute(0, 3, 1, 2).float().div(255)
        y_all = torch.from_numpy(domain.labels).long()
        images += len(y_all)
        wrong, differ = {"metatta": 0, "authors": 0}, 0
        for i in range(0, len(x_all), args.batch_size):
            x, y = x_all[i:i + args.batch_size], y_all[i:i + args.batch_size]
            torch.manual_seed(step)
            start = time.perf_counter()
            a = ours(x)
            seconds["metatta"] += time.perf_counter() - start
            torch.manual_seed(step)
            start = time.perf_counter()
            b, _, _ = ref.forward_and_adapt_deyo(x, step, theirs, options, optimizer, margin, margin_e0)
            seconds["authors"] += time.perf_counter() - start
            step += 1
            wrong["metatta"] += int((a.argmax(1) != y).sum())
            wrong["authors"] += int((b.argmax(1) != y).sum())
            differ += int((a.argmax(1) != b.argmax(1)).sum())
        gap = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(ours_params, params))
        rows.append({"domain": domain.name, "error_metatta": 100 * wrong["metatta"] / len(y_all),
                     "error_authors": 100 * wrong["authors"] / len(y_all), "predictions_differing": differ,
                     "max_param_difference": gap})
        print(rows[-1])
    record = {"protocol": vars(args) | {"authors_repo": str(args.authors_repo), "benchmark_root": str(args.benchmark_root),
                                        "checkpoint": str(args.checkpoint)},
              "rows": rows, "images_per_second": {k: images / v for k, v in seconds.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=1, default=str))
    table = markdown_table(["corruption", "metatta", "authors", "predictions differing", "max param difference"],
                           [[r["domain"], f"{r['error_metatta']:.1f}", f"{r['error_authors']:.1f}",
                             r["predictions_differing"], f"{r['max_param_difference']:.1e}"] for r in rows])
    speed = ", ".join(f"{k} {v:.0f} img/s" for k, v in record["images_per_second"].items())
    (RESULTS / f"{args.tag}.md").write_text(f"{table}\n\nSpeed (same process, same CPU): {speed}\n")
    return record


if __name__ == "__main__":
    main()
