"""An evaluation experiment: benchmark + source model + stream + methods.

`ExperimentConfig` is the schema of `configs/*/*.yaml` files that
`launch/evaluate.py` runs; `run_experiment` builds what is missing (the
"-C" benchmark files, the source model), evaluates every method on a fresh copy
of the source model, writes results JSON, a markdown table and a plot, and logs
all of it to MLflow.

`build_row_method` is the one place a method is built for a stream: it builds the
context inputs the method declares (`method_context`: EATA's Fisher batches, source
feature statistics, trained adapters; a plug-in's are its base's) and the method with
its lr scaled to the stream's batch. Experiments and Ray Tune trials (trainers/tune.py)
both use it, and run the one evaluation loop, `metatta.evaluation.evaluate`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from metatta import tracking
from metatta.config import build_dataclass
from metatta.data import ccc
from metatta.data.benchmark_files import capped_num_images, fashion_mnist_c, read_cifar_c
from metatta.data.clean import load_clean
from metatta.data.domains import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, HELD_OUT_CORRUPTIONS, check_corruption_names
from metatta.data.streams import GENERATED_SETTINGS, SETTINGS, build_stream
from metatta.device import resolve_device
from metatta.evaluation import Result, evaluate, save_results
from metatta.learned.mgg import load_mgg
from metatta.methods.base import TTAMethod, build_method, method_class
from metatta.models import load_source_model
from metatta.models.checkpoint import checkpoint_hash, load_feature_stats
from metatta.references import pin_references
from metatta.reporting import error_table, plot_results, protocol_line
from metatta.source import source_checkpoint
from metatta.ssl.networks import load_network

log = logging.getLogger(__name__)

CORRUPTION_SETS = {"benchmark": BENCHMARK_CORRUPTIONS, "held_out": HELD_OUT_CORRUPTIONS, "all": ALL_CORRUPTIONS}
BENCHMARKS = ("fashion_mnist_c", "cifar10_c", "cifar100_c")


@dataclasses.dataclass
class BenchmarkConfig:
    name: str = "fashion_mnist_c"  # fashion_mnist_c | cifar10_c | cifar100_c
    root: str | None = None  # directory of <corruption>.npy files; built for fashion_mnist_c when absent
    corruptions: str | list[str] = "benchmark"  # benchmark | held_out | all | explicit list
    severities: list[int] = dataclasses.field(default_factory=lambda: [5])
    num_images: int | None = None  # per domain; None for all
    first_image: int = 0  # per domain, images before it are skipped (e.g. an adapter's training images)

    def corruption_names(self) -> list[str]:
        if isinstance(self.corruptions, str):
            if self.corruptions not in CORRUPTION_SETS:
                raise ValueError(
                    f"benchmark.corruptions: {self.corruptions!r} is not one of {sorted(CORRUPTION_SETS)} or a list"
                )
            return list(CORRUPTION_SETS[self.corruptions])
        return check_corruption_names(self.corruptions)


@dataclasses.dataclass
class SourceConfig:
    checkpoint: str | None = None  # an existing checkpoint; else trained from `config` if absent
    config: str | None = "configs/fmnist_c/source.yaml"


@dataclasses.dataclass
class StreamConfig:
    setting: str = "continual"  # episodic | continual | gradual | mixed | label_shift | ccc
    batch_size: int = 200
    seed: int = 0
    dirichlet_alpha: float = 0.1  # label_shift only
    # ccc only: the generated lifelong stream's options (metatta.data.ccc.OPTIONS but `model`, which is the
    # source model): difficulty, num_images, transition_images, corruptions, ...; the benchmark's clean test
    # images are its source and `benchmark.corruptions/severities/num_images` do not apply
    ccc: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stream_options(self, model: torch.nn.Module) -> dict[str, Any]:
        """The setting's options for `build_stream`."""
        if self.setting == "label_shift":
            return {"dirichlet_alpha": self.dirichlet_alpha}
        if self.setting == "ccc":
            return {**self.ccc, "model": model}
        return {}

    def check(self) -> None:
        """The setting and its options, checked before any work (ValueError names the field)."""
        if self.setting not in SETTINGS + GENERATED_SETTINGS:
            raise ValueError(f"stream.setting: unknown stream setting {self.setting!r}; "
                             f"known: {', '.join(SETTINGS + GENERATED_SETTINGS)}")
        if self.ccc and self.setting != "ccc":
            raise ValueError(f"stream.ccc: options of the ccc setting given for setting {self.setting!r}")
        if self.setting == "ccc":
            try:
                ccc.check_config_options(self.ccc)
            except ValueError as e:
                raise ValueError(f"stream.ccc: {e}") from e


@dataclasses.dataclass
class MethodSpec:
    name: str
    label: str | None = None  # row name in tables; defaults to name
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: str | None = None  # a trained adapter: models:/<name>@<alias>, models:/<name>/<N> or a directory
    # tuned settings (a Ray Tune search's best config, trainers/tune.py): a YAML file, a settings
    # directory, or models:/<name>@<alias>; `config` is applied on top of them
    settings: str | None = None


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    methods: list[MethodSpec] = dataclasses.field(default_factory=list)
    device: str = "auto"
    output_dir: str = "outputs"
    fisher_images: int = 500  # clean training images for methods that need source statistics (EATA)
    source_images: int = 5000  # labelled clean training images for methods that replay source data (RMT)
    mlflow: bool = True
    progress: bool = True


def experiment_config(data: dict[str, Any]) -> ExperimentConfig:
    cfg = build_dataclass(ExperimentConfig, data, where="experiment")
    if cfg.benchmark.name not in BENCHMARKS:
        raise ValueError(f"benchmark.name: unknown benchmark {cfg.benchmark.name!r}; known: {list(BENCHMARKS)}")
    if not cfg.methods:
        raise ValueError("experiment: `methods` is empty; list at least one method")

    cfg.stream.check()
    for spec in cfg.methods:
        method_class(spec.name)  # unknown names fail here, before any work
        if spec.settings is not None and not spec.settings.startswith("models:/") and not Path(spec.settings).exists():
            raise ValueError(f"methods: {spec.name}.settings: no such file {spec.settings!r}")
        if spec.settings is not None:  # tuned settings that do not fit the method fail here, before any work
            try:
                method_class(spec.name).make_config(method_config(spec))
            except ValueError as e:
                raise ValueError(f"methods: {spec.name}.settings {spec.settings}: {e}") from e
    check_method_configs(cfg)
    cfg.benchmark.corruption_names()
    return cfg


def check_method_configs(cfg: ExperimentConfig) -> None:
    """Every row's method config, validated (`MethodConfig.validate`, a plug-in's base's included),
    so a bad row is refused before the first row runs; the error names the row."""
    for i, spec in enumerate(cfg.methods):
        try:
            method_class(spec.name).make_config(method_config(spec))
        except ValueError as e:
            raise ValueError(f"methods[{i}]: {e}") from e


def check_rows(cfg: ExperimentConfig) -> None:
    """What `run_experiment` checks before any work: every row's config, and a trained adapter
    named for every row that needs one (it may be set after parsing, e.g. by `with_adapter`)."""
    check_method_configs(cfg)
    for i, spec in enumerate(cfg.methods):
        kinds = [ADAPTER_INPUTS[key] for key in required_inputs(spec) if key in ADAPTER_INPUTS]
        if kinds and spec.adapter is None:
            raise ValueError(f"methods[{i}]: method {spec.name}: needs a trained adapter "
                             f"(set `adapter: models:/{kinds[0]}@champion` or a path)")


def required_inputs(spec: MethodSpec) -> tuple[str, ...]:
    """The context inputs of the method a spec builds (a plug-in such as NanoAdapt: its base's)."""
    cls = method_class(spec.name)
    return cls.inputs_for(cls.make_config(method_config(spec)))


def method_config(spec: MethodSpec) -> dict[str, Any]:
    """The spec's method config: its tuned `settings` (if any), overridden by its explicit `config`."""
    if spec.settings is None:
        return dict(spec.config)

    settings, info = tracking.load_settings(spec.settings)
    if info.get("method") and info["method"] != spec.name:
        raise ValueError(f"method {spec.name}: settings {spec.settings} were tuned for method {info['method']!r}")
    return {**settings, **spec.config}


def with_settings(cfg: ExperimentConfig, method: str, settings: str) -> ExperimentConfig:
    """Give every `method` row the tuned `settings`; add a row if there is none."""
    method_class(method)
    cfg = copy.deepcopy(cfg)
    rows = [s for s in cfg.methods if s.name == method]
    for spec in rows:
        spec.settings = settings
    if not rows:
        rows = [MethodSpec(name=method, label=f"{method} (tuned)", settings=settings)]
        cfg.methods.append(rows[0])
    for spec in rows:  # fail before any work when the settings do not fit the method
        try:
            method_class(spec.name).make_config(method_config(spec))
        except ValueError as e:
            raise ValueError(f"--settings {method}={settings}: {e}") from e
    return cfg


def benchmark_root(cfg: BenchmarkConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    if cfg.name != "fashion_mnist_c":
        raise ValueError(f"benchmark.root is required for {cfg.name} (a directory of <corruption>.npy files)")

    return fashion_mnist_c(corruptions=cfg.corruption_names())  # only the files this benchmark reads


def load_domains(cfg: BenchmarkConfig, setting: str = "continual"):
    """The benchmark's domains; `num_images` is capped, with a warning, to what the files hold
    (a small dataset, e.g. a digits-sized one, cannot give a config's 1,000 images per domain).
    A generated setting (ccc) takes one domain, the benchmark's clean test images."""
    if setting in GENERATED_SETTINGS:
        return [ccc.clean_domain(*load_clean(cfg.name.removesuffix("_c"), "test"))]
    root = benchmark_root(cfg)
    num_images = capped_num_images(root, cfg.num_images, cfg.first_image, "benchmark.num_images")
    return read_cifar_c(root, cfg.corruption_names(), cfg.severities, num_images=num_images,
                        first_image=cfg.first_image)


def images_used(cfg: BenchmarkConfig, domains) -> int | None:
    """The images per domain the run used: the config's number, or fewer when load_domains capped it
    (None, all of them, stays None so that results keep matching recorded ones)."""
    if cfg.num_images is None or not domains:
        return cfg.num_images
    return min(cfg.num_images, len(domains[0].labels))


def source_model(cfg: SourceConfig, device: torch.device) -> tuple[torch.nn.Module, Path]:
    path = source_checkpoint(cfg.checkpoint, cfg.config)
    return load_source_model(path, device=device), path


# Context inputs that hold a trained adapter, by the adapter kind (adapter.json "kind") they take;
# `with_adapter` adds a row of the default method when a config has none taking that kind.
ADAPTER_INPUTS = {"mgg": "mgg", "cta_model": "cta", "ttt_model": "ttt"}
DEFAULT_ADAPTER_METHODS = {"mgg": "mgtta", "cta": "cta", "ttt": "ttt"}


class ContextSettings(Protocol):
    """What the context builder reads from a run's config (an ExperimentConfig, a search's SearchConfig)."""

    benchmark: BenchmarkConfig
    stream: StreamConfig
    fisher_images: int


def build_row_method(spec: MethodSpec, model: torch.nn.Module, cfg: ContextSettings, checkpoint: Path,
                     device: torch.device, cache: dict[str, Any] | None = None) -> TTAMethod:
    """The method of `spec` on `model` (used as is: pass a copy to keep the source), with the context
    inputs it declares and its lr scaled to the stream's batch size (MethodConfig.lr_batch_size)."""
    context = method_context(spec, cfg, checkpoint, device, cache if cache is not None else {})
    return build_method(spec.name, model, method_config(spec), batch_size=cfg.stream.batch_size, **context)


def method_context(spec: MethodSpec, cfg: ContextSettings, checkpoint: Path, device: torch.device,
                   cache: dict[str, Any]) -> dict[str, Any]:
    """The inputs a method declares (`TTAMethod.inputs_for`; a plug-in: its base's); inputs shared
    by rows (source statistics, Fisher batches) are built once per `cache`."""
    context = {}
    for key in required_inputs(spec):
        if key == "mgg":
            context[key] = load_adapter_mgg(spec, checkpoint)
            continue
        if key in ADAPTER_INPUTS:
            context[key] = load_adapter_network(spec, checkpoint, ADAPTER_INPUTS[key], device)
            continue
        if key not in cache:
            cache[key] = _build_context(key, cfg, checkpoint, device)
        context[key] = cache[key]
    return context


def checked_adapter(spec: MethodSpec, checkpoint: Path, kind: str) -> Path:
    """The local directory of the adapter a method spec names, refused when its adapter.json
    says it was trained for another source checkpoint (sha256) than `checkpoint`."""
    if spec.adapter is None:
        raise ValueError(f"method {spec.name}: needs a trained adapter "
                         f"(set `adapter: models:/{kind}@champion` or a path)")
    path = tracking.adapter_directory(spec.adapter)
    info = tracking.adapter_info(path)
    trained_for = info.get("source_checkpoint_sha256")
    if trained_for and trained_for != checkpoint_hash(checkpoint):
        raise ValueError(f"adapter {spec.adapter} was trained for source checkpoint {info.get('source_checkpoint')} "
                         f"(sha256 {trained_for[:12]}), not {checkpoint} ({checkpoint_hash(checkpoint)[:12]})")
    return path


def load_adapter_mgg(spec: MethodSpec, checkpoint: Path):
    """The trained MGG a method spec names, checked against the source model it was trained for."""
    return load_mgg(checked_adapter(spec, checkpoint, "mgg"))


def load_adapter_network(spec: MethodSpec, checkpoint: Path, kind: str, device: torch.device):
    """The trained CTA/TTT network (`metatta.ssl.networks`) a method spec names, checked likewise."""
    net, _ = load_network(checked_adapter(spec, checkpoint, kind), kind=kind)
    return net.to(device)


def _build_context(key: str, cfg: ContextSettings, checkpoint: Path, device: torch.device) -> Any:
    if key == "source_stats":

        return load_feature_stats(checkpoint, device=device)
    if key in ("fisher_batches", "source_batches"):

        name = cfg.benchmark.name.removesuffix("_c")
        images, labels = load_clean(name, "train")
        generator = torch.Generator().manual_seed(cfg.stream.seed)
        count = cfg.fisher_images if key == "fisher_batches" else cfg.source_images
        idx = torch.randperm(len(images), generator=generator)[:count].numpy()
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div(255)
        starts = range(0, len(x), cfg.stream.batch_size)
        if key == "fisher_batches":
            return [x[i : i + cfg.stream.batch_size].to(device) for i in starts]
        y = torch.as_tensor(labels[idx]).long()
        return [(x[i : i + cfg.stream.batch_size].to(device), y[i : i + cfg.stream.batch_size].to(device))
                for i in starts]
    raise ValueError(f"no builder for method context input {key!r}")


def run_experiment(cfg: ExperimentConfig) -> list[Result]:
    check_rows(cfg)  # a bad row fails before the first row runs, not after the rows before it
    # models:/...@alias resolved (and adapters checked) once, before any work: rows load those versions,
    # results record them
    pinned_methods, references = pin_references(cfg.methods)
    cfg = dataclasses.replace(cfg, methods=pinned_methods)
    device = resolve_device(cfg.device)
    domains = load_domains(cfg.benchmark, cfg.stream.setting)
    model, checkpoint = source_model(cfg.source, device)
    protocol = {
        "experiment": cfg.name,
        "benchmark": cfg.benchmark.name,
        "domains": [d.name for d in domains],
        "severities": cfg.benchmark.severities,
        "batch_size": cfg.stream.batch_size,
        "num_images_per_domain": images_used(cfg.benchmark, domains),
        "first_image": cfg.benchmark.first_image,
        "seed": cfg.stream.seed,
        "source_checkpoint": str(checkpoint),
        "source_checkpoint_sha256": checkpoint_hash(checkpoint),
        **({"ccc": dict(cfg.stream.ccc)} if cfg.stream.setting == "ccc" else {}),
    }
    stream_options = cfg.stream.stream_options(model)
    results, cache = [], {}
    for spec, reference in zip(cfg.methods, references):
        torch.manual_seed(cfg.stream.seed)
        stream = build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=cfg.stream.seed, **stream_options)
        method = build_row_method(spec, copy.deepcopy(model), cfg, checkpoint, device, cache)
        label = spec.label or spec.name
        log.info("evaluating %s on %d images (%s, batch %d)", label, stream.num_images, stream.setting, stream.batch_size)
        result = evaluate(method, stream, method_name=label, device=device, progress=cfg.progress,
                          protocol={**protocol, **reference, "method_config": dataclasses.asdict(method.config),
                                    "lr_scaling": method.lr_scaling})
        log.info("%s: mean error %.2f%%, %.0f img/s", label, result.mean_error, result.images_per_second)
        results.append(result)
    write_report(results, cfg)
    return results


def write_report(results: list[Result], cfg: ExperimentConfig) -> Path:
    out = Path(cfg.output_dir) / cfg.name
    json_path = save_results(results, out / "results.json")
    table = error_table(results)
    (out / "table.md").write_text(f"{table}\n\n{protocol_line(results[0])}\n")
    plot = plot_results(results, out / "errors.png", title=f"{cfg.name}: {protocol_line(results[0])}")
    print(f"\n{cfg.name}: error (%), {protocol_line(results[0])}\n{table}\n\nwrote {json_path}, {plot}")
    if cfg.mlflow:

        with tracking.start_run(cfg.name, params=dataclasses.asdict(cfg)):
            tracking.log_results(results, artifacts=[json_path, out / "table.md", plot])
    return out


def with_adapter(cfg: ExperimentConfig, adapter: str, method: str | None = None) -> ExperimentConfig:
    """Point every method that takes this adapter's kind (adapter.json "kind": an MGG, a CTA or
    a TTT network; anything else counts as an MGG) at `adapter`; add a row of `method` (default:
    the kind's method, e.g. mgtta, cta) if none does."""
    kind = tracking.adapter_info(tracking.adapter_directory(adapter)).get("kind")
    kind = kind if kind in DEFAULT_ADAPTER_METHODS else "mgg"
    inputs = {key for key, k in ADAPTER_INPUTS.items() if k == kind}
    cfg = copy.deepcopy(cfg)
    takers = [s for s in cfg.methods if inputs & set(required_inputs(s))]
    for spec in takers:
        spec.adapter = adapter
    if not takers:
        cfg.methods.append(MethodSpec(name=method or DEFAULT_ADAPTER_METHODS[kind], adapter=adapter))
    return cfg
