"""Speed and error of metatta's PALM, LAW, Tent and BN against the authors' code, in one run.

Runs the PALM authors' code (sarthaxxxxx/PALM, `classification/methods/`: `ours.py` is PALM,
`law.py` their LAW baseline, `tent.py`, `norm.py` for BN), imported unmodified from a checkout
given with `--palm-repo`, and optionally the LAW authors' own `law.py` (junia3/LayerwiseTTA,
`--law-repo`), beside `metatta.methods` on the same stream: Fashion-MNIST-C, continual over the
corruptions at severity 5, `--num-images` per corruption in the project's within-corruption
order (`build_stream`, seed `--seed`), batch `--batch-size`, the same source checkpoint. Every
implementation runs with its published CIFAR-10-C settings (ours: the method's defaults, or
with `--metatta-config FIELD=VALUE ...`, e.g. precision=bf16). Their methods get the model as
loaded (PyTorch's default NCHW layout, as their own pipeline builds it); ours move their copy to
NHWC (`channels_last`, our default).

Rounds alternate the two sides (round 1: metatta then authors, round 2: authors then metatta,
...), each run on a fresh copy of the source model with the global RNG seeded alike, and
`torch.set_num_threads(--threads)`. Only the method calls are timed; the batches are built
once beforehand. Per method: both mean errors, and the speed ratio (authors' seconds /
metatta's seconds) of each round, with its min / median / max, in wall-clock time and in CPU
time of the process (on a machine shared with other jobs the CPU time counts the work done
without the waits for a core; with one thread it is the steadier of the two). Writes
benchmarks/results/<--tag>.{json,md}.

    python benchmarks/speed_vs_authors.py --palm-repo /path/to/PALM [--law-repo /path/to/LayerwiseTTA]
        [--methods palm law tent bn] [--rounds 5] [--num-images 1000] [--corruptions ...] [--threads 2]
        [--metatta-config precision=bf16] [--tag NAME]

Shims (here, never in their files): their `TTAMethod.__init__` puts a counter on CUDA
(`torch.tensor(...).cuda()`), so `.cuda()` is the identity while their methods are built on a
machine without CUDA; `models.model` (robustbench, timm, gdown and their model zoo) is replaced
by a stub, since base.py only needs its `ResNetDomainNet126` name for an isinstance check; their
config object is a namespace with the fields their methods read; their `get_tta_transforms`
knows 32-pixel (CIFAR) and 224-pixel images only, so its padding and centre crop are set to the
stream's image size (28), which is what our augmentation does.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torchvision import transforms as tv_transforms

from metatta.config import ConfigError, apply_override
from metatta.data.domains import BENCHMARK_CORRUPTIONS
from metatta.data.streams import build_stream
from metatta.experiment import BenchmarkConfig, SourceConfig, load_domains, source_model
from metatta.methods import build_method
from metatta.reporting import benchmark_command, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("palm", "law", "tent", "bn")
NUM_CLASSES = 10


# ---- the authors' side ---------------------------------------------------------------------
def authors_config(method: str, batch_size: int) -> types.SimpleNamespace:
    """Their yacs config, as a namespace holding what their methods read: conf.py's defaults
    with cfgs/cifar10_c/{ours,law,tent,norm_test}.yaml on top (Tent: our Tent's settings)."""
    ns = types.SimpleNamespace
    lr = {"palm": 5e-4, "law": 1e-3, "tent": 1e-3, "bn": 1e-3}[method]
    return ns(
        MODEL=ns(EPISODIC=False, ADAPTATION={"palm": "ours", "bn": "norm_test"}.get(method, method)),
        CORRUPTION=ns(DATASET="cifar10_c"),
        OPTIM=ns(STEPS=1, METHOD="Adam", LR=lr, BETA=0.9, WD=0.0, MOMENTUM=0.9, DAMPENING=0.0, NESTEROV=True),
        TEST=ns(WINDOW_LENGTH=1, BATCH_SIZE=batch_size),
        OURS=ns(BETA3=0.5, TEMP=50.0, THRESH=1.0, LAMBDA=0.01),
        LAW=ns(TAU=1.0, LAMBDA=0.1),
    )


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """Their base class moves a counter to CUDA in __init__; without CUDA, leave it where it is."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def import_authors(palm_repo: Path) -> dict[str, Any]:
    """Their method classes {palm, law, tent, bn}, imported from the checkout's classification/."""
    root = palm_repo / "classification"
    for name in ("methods/base.py", "methods/ours.py", "methods/law.py", "methods/tent.py", "methods/norm.py",
                 "augmentations/transforms_cotta.py"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"--palm-repo: no classification/{name} under {palm_repo}")
    if "models.model" not in sys.modules:  # base.py's only use of it: an isinstance check
        stub = types.ModuleType("models.model")
        stub.ResNetDomainNet126 = type("ResNetDomainNet126", (), {})
        package = types.ModuleType("models")
        package.model = stub
        sys.modules.update({"models": package, "models.model": stub})
    # Their code imports `methods.*` and `augmentations.*` from the classification/ directory; those are
    # directories without __init__.py, which a module of the same name elsewhere on sys.path (this
    # folder's methods.py) would shadow, so the two packages are declared here with their paths.
    for package in ("methods", "augmentations"):
        module = types.ModuleType(package)
        module.__path__ = [str(root / package)]
        sys.modules[package] = module
    return {"palm": importlib.import_module("methods.ours").OURS, "law": importlib.import_module("methods.law").LAW,
            "tent": importlib.import_module("methods.tent").Tent, "bn": importlib.import_module("methods.norm").Norm}


def import_official_law(law_repo: Path) -> Any:
    """The LAW authors' own LAW class (junia3/LayerwiseTTA); needs import_authors first (base class)."""
    path = law_repo / "classification" / "methods" / "law.py"
    if not path.is_file():
        raise FileNotFoundError(f"--law-repo: no classification/methods/law.py under {law_repo}")
    spec = importlib.util.spec_from_file_location("law_official_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LAW


def fit_transforms(method: Any, image_size: int) -> None:
    """Their CoTTA transforms padded and cropped for `image_size` pixels (they know 32 and 224 only)."""
    compose = getattr(method, "transforms", None)
    if compose is None:
        return
    for t in compose.transforms:
        if isinstance(t, tv_transforms.Pad):
            t.padding = image_size // 2
        elif isinstance(t, tv_transforms.CenterCrop):
            t.size = (image_size, image_size)


def authors_runner(cls: Any, method: str, source: torch.nn.Module, batch_size: int,
                   image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    with cuda_is_identity():
        adapted = cls(authors_config(method, batch_size), copy.deepcopy(source), NUM_CLASSES)
    fit_transforms(adapted, image_size)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # as their utils.get_accuracy; forward_and_adapt enables grad itself
            return adapted(x)

    return run


# ---- our side --------------------------------------------------------------------------------
def metatta_runner(method: str, source: torch.nn.Module, batch_size: int,
                   overrides: dict[str, Any] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our method at its defaults (with `overrides`, e.g. precision=bf16), lr scaled to the batch."""
    return build_method(method, copy.deepcopy(source), dict(overrides or {}), batch_size=batch_size)


def parse_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        try:
            apply_override(overrides, item)
        except ConfigError as e:
            parser.error(f"--metatta-config: {e}")
    return overrides


# ---- the comparison ------------------------------------------------------------------------------
def timed_run(runner: Callable[[torch.Tensor], torch.Tensor], batches: list, seed: int) -> dict[str, Any]:
    """Seconds spent in the method calls (wall clock, and CPU time of this process: on a shared
    machine the latter counts only the work done, not the waits for a core) and the error (%) per
    domain, over the whole stream."""
    torch.manual_seed(seed)
    seconds, cpu_seconds, wrong, seen = 0.0, 0.0, {}, {}
    for x, y, domain in batches:
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = runner(x)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - start_cpu
        wrong[domain] = wrong.get(domain, 0) + int((logits.argmax(1) != y).sum())
        seen[domain] = seen.get(domain, 0) + len(y)
    errors = {d: 100.0 * wrong[d] / seen[d] for d in seen}
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "domain_errors": errors,
            "mean_error": statistics.mean(errors.values())}


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean error of each side (over rounds), and the speed ratio per round."""
    ratios = [r["authors"]["seconds"] / r["metatta"]["seconds"] for r in runs]
    cpu_ratios = [r["authors"]["cpu_seconds"] / r["metatta"]["cpu_seconds"] for r in runs]
    images = runs[0]["images"]
    out = {"method": name, "ratios": ratios, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
           "ratio_max": max(ratios), "cpu_ratios": cpu_ratios, "cpu_ratio_min": min(cpu_ratios),
           "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_max": max(cpu_ratios)}
    for side in ("metatta", "authors"):
        errors = [r[side]["mean_error"] for r in runs]
        out[f"error_{side}"] = statistics.mean(errors)
        out[f"error_{side}_spread"] = max(errors) - min(errors)
        out[f"images_per_second_{side}"] = statistics.median(images / r[side]["seconds"] for r in runs)
    return out


def compare(name: str, ours: Callable[[], Callable], theirs: Callable[[], Callable], batches: list, rounds: int,
            seed: int) -> dict[str, Any]:
    """`rounds` alternated runs of both sides (fresh methods each run); the summary with the runs."""
    images = sum(len(y) for _, y, _ in batches)
    runs = []
    for r in range(rounds):
        order = [("metatta", ours), ("authors", theirs)]
        if r % 2:
            order.reverse()
        run = {"round": r + 1, "first": order[0][0], "images": images}
        for side, build in order:
            run[side] = timed_run(build(), batches, seed)
        runs.append(run)
        print(f"{name} round {r + 1}: metatta {run['metatta']['mean_error']:.2f}% {run['metatta']['seconds']:.1f} s, "
              f"authors {run['authors']['mean_error']:.2f}% {run['authors']['seconds']:.1f} s, "
              f"ratio {run['authors']['seconds'] / run['metatta']['seconds']:.2f}", flush=True)
    return summarize(name, runs) | {"runs": runs}


def stream_batches(num_images: int, corruptions: list[str], batch_size: int, seed: int) -> list:
    domains = load_domains(BenchmarkConfig(corruptions=corruptions, severities=[5], num_images=num_images))
    return [(b.x, b.y, b.domain) for b in build_stream(domains, "continual", batch_size, seed=seed)]


def report(summaries: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    rows = [[s["method"], f"{s['error_metatta']:.2f}", f"{s['error_authors']:.2f}",
             f"{s['images_per_second_metatta']:.0f}", f"{s['images_per_second_authors']:.0f}",
             f"**{s['ratio_median']:.2f}x**", f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}",
             f"**{s['cpu_ratio_median']:.2f}x**", f"{s['cpu_ratio_min']:.2f}-{s['cpu_ratio_max']:.2f}"]
            for s in summaries]
    table = markdown_table(["method", "error metatta (%)", "error authors (%)", "img/s metatta", "img/s authors",
                            "speed ratio (wall, median)", "min-max", "CPU-time ratio (median)", "min-max"], rows)
    return (f"Command: `python {' '.join(protocol['command'])}`\n\n{protocol['rounds']} alternated rounds, "
            f"{protocol['threads']} threads, {protocol['num_images']} images x {len(protocol['corruptions'])} "
            f"corruptions (severity 5, continual, batch {protocol['batch_size']}), checkpoint "
            f"{protocol['checkpoint']}. metatta's methods at their defaults"
            f"{' with ' + str(protocol['metatta_config']) if protocol['metatta_config'] else ''}, the authors' "
            f"with their CIFAR-10-C settings. Ratio: the authors' seconds / metatta's, per round, in wall-clock "
            f"time and in CPU time of the process (img/s: wall clock).\n\n{table}\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--palm-repo", type=Path, required=True, help="a checkout of sarthaxxxxx/PALM")
    parser.add_argument("--law-repo", type=Path, default=None,
                        help="a checkout of junia3/LayerwiseTTA: adds a row against the LAW authors' own code")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-images", type=int, default=1000, help="per corruption")
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metatta-config", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="overrides of our methods' configs, e.g. precision=bf16 (the authors' side is unchanged)")
    parser.add_argument("--tag", default="speed_vs_authors")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    overrides = parse_overrides(args.metatta_config, parser)
    torch.set_num_threads(args.threads)
    authors = import_authors(args.palm_repo)
    if args.law_repo is not None:
        authors["law (LAW authors' repo)"] = import_official_law(args.law_repo)
    source, checkpoint = source_model(SourceConfig(), "cpu")
    batches = stream_batches(args.num_images, args.corruptions, args.batch_size, args.seed)
    image_size = batches[0][0].shape[-1]
    rows = list(args.methods) + (["law (LAW authors' repo)"] if args.law_repo is not None else [])
    summaries = []
    for row in rows:
        ours_name = row.split()[0]
        summaries.append(compare(
            row, lambda: metatta_runner(ours_name, source, args.batch_size, overrides),
            lambda: authors_runner(authors[row], ours_name, source, args.batch_size, image_size),
            batches, args.rounds, args.seed))
    protocol = {"command": benchmark_command(__file__, argv if argv is not None else sys.argv[1:]),
                "rounds": args.rounds, "threads": args.threads, "num_images": args.num_images,
                "corruptions": args.corruptions, "batch_size": args.batch_size, "seed": args.seed,
                "metatta_config": overrides,
                "checkpoint": str(checkpoint), "palm_repo": str(args.palm_repo),
                "law_repo": None if args.law_repo is None else str(args.law_repo), "torch": torch.__version__}
    record = {"protocol": protocol, "summaries": summaries}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(report(summaries, protocol))
    print((RESULTS / f"{args.tag}.md").read_text())
    return record


if __name__ == "__main__":
    main()
