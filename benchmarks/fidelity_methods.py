"""Fidelity: metatta's methods against the broadest public TTA codebase's, on the project's stream.

Runs the implementations of mariodoebler/test-time-adaptation (`classification/methods/*.py`,
imported unmodified from a checkout given with `--reference-repo`; needs `yacs`) of RoTTA, RMT,
SANTA, ROID, CMF, RPL, MEMO, TTAug, LAME, EATA, ETA, RDumb, SAR, CoTTA, DeYO, BN-alpha and BN-EMA,
with Source, BN and Tent as sanity rows, beside
metatta's on the Fashion-MNIST-C stream (severity 5, the project's within-corruption order:
`metatta.data.streams`, seed 0) with the project's source ResNet. Settings: continual at
batch 200 and episodic (reset at every corruption, the project's episodic) at batch 64;
MEMO and TTAug work image by image with no state carried between images, so they run once.
Both sides use their CIFAR-10-C config (`cfgs/cifar10_c/<method>.yaml` over their conf.py
defaults; TTAug has no file: conf.py's defaults), which metatta's config dataclasses mirror;
`config_mismatches` lists where they do not (and where a constant of their code differs), and a
run also compares the names of the parameters each side's optimizer updates. Where metatta's
defaults are another setting, the pair's `ours_config` sets their cfg's: EATA/ETA Adam lr 1e-3
(metatta: the paper's SGD lr 0.005); SAR lr 1e-3 (their SAR builds SAM around SGD with
OPTIM.LR and OPTIM.MOMENTUM whatever OPTIM.METHOD says; metatta: the authors' ImageNet 2.5e-4),
every BN layer adapted (their rule skips modules named 'layer4', which this ResNet has none of;
metatta's `top_layers` skips its last stage) and the EMA cleared at a recovery (their `reset()`
sets it to None; the authors' SAR keeps it, metatta's default). EATA's Fisher comes from
SOURCE.NUM_SAMPLES (2,000) clean training images at the test batch size, the same batches on both
sides (their `get_source_loader`, below).

Two modes per stochastic method (`--modes`):

- `shared`: both sides draw the same augmentations: the reference's augmentation attribute
  (`transform`, `tta_transform`) is replaced by metatta's function and MEMO/TTAug get
  metatta's AugMix views, with torch's seed set alike before each batch. What is left is
  each side's method mechanism, which should then agree like a deterministic method's
  (0.1 points per corruption);
- `own`: each side with its own augmentation code (theirs on PIL images, numpy's and
  torch's generators), `--seeds` seeds of each; the errors should agree within the seeds'
  spread. metatta's CoTTA and ROID augmentations draw the reference's random numbers in the
  reference's order, so for RoTTA, RMT, SANTA, ROID and CMF this mode too gives the same
  images on both sides; MEMO's and TTAug's AugMix views differ, and so do CoTTA's: metatta's
  CoTTA draws its 32 views batched by default (`batched_views`, one parameter set per view),
  which shared mode turns off so that its loop of views draws what their loop draws.

Shims (the harness's, nothing of theirs is edited): their `methods` package is entered
without its `__init__` (which imports every method, the CLIP ones included); `models.model`
(their model zoo needs open_clip and robustbench) provides only what these methods import
(`split_up_model`, here the ResNet's pooled features and `fc`; `ResNetDomainNet126`, which
nothing here is); `datasets.data_loading.get_source_loader` gives RMT and SANTA the same
labelled source batches metatta's RMT gets (5,000 training images, seed 0, unshuffled
cycle) and EATA its Fisher batches (above); `iopath` for conf.py; their DeYO imports `einops`
(installed, not shimmed); on a machine without CUDA, CMF's one `.cuda()` is made a
no-op while it is built. The model gets `model_preprocess` = CenterCrop(28) so that their
code sizes its augmentations for 28x28 images (it assumes 32 for CIFAR); their AugMix
pre-augmentation is their CIFAR one (pad-4 crop, flip) at 28 pixels. Their RoTTA at HEAD
calls `loss_calculation(x)`, defined without `x` (a TypeError on the first update unless
mixed precision on CUDA); the shim drops the argument. Their MEMO's SGD uses conf.py's
NESTEROV True (its single step from a fresh optimizer is then 1.9 lr, where MEMO's authors take
one plain SGD step of lr, as metatta does); the reference runs without Nesterov here.

Learning rate: their code uses the cfg's lr at any batch size; metatta's runners scale it down
linearly below a method's published batch (`MethodConfig.lr_batch_size`), so the harness
builds metatta's methods with `scale_lr: false` to give both sides the same lr.

Resets a method makes by itself (SAR's recovery, RDumb's schedule) are counted on both sides (theirs
by wrapping the instance's `reset`, inside its forward). `--ours-set` / `--theirs-set` set config
fields on one side (a what-if: the mismatches then name it) or on both alike (RDumb's schedule at a
length these short streams reach).

Speed: per batch, the two sides alternate which goes first; img/s of each over the run
(their MEMO/TTAug include making their views, which their data loader does).

    python benchmarks/fidelity_methods.py --reference-repo /tmp/tta-ref --num-images 200 \\
        --corruptions gaussian_noise fog pixelate [--methods rotta memo ...] [--seeds 0 1 2]

Writes benchmarks/results/<--tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from torchvision import transforms

from metatta.data.benchmark_files import read_cifar_c
from metatta.data.clean import load_clean
from metatta.data.streams import build_stream
from metatta.methods import build_method
from metatta.methods.augmix import augmix_views
from metatta.methods.roid import roid_augment
from metatta.models import load_source_model
from metatta.paths import cache_root
from metatta.reporting import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CORRUPTIONS = ("gaussian_noise", "fog", "pixelate")
SETTINGS = (("continual", 200), ("episodic", 64))
NUM_CLASSES = 10
SOURCE_IMAGES = 5000  # metatta's ExperimentConfig.source_images


class MethodPair(NamedTuple):
    """One method on both sides: metatta's registered name and config overrides; the reference's
    module, class and cfg file (cfgs/cifar10_c/<cfg_file>.yaml, None: conf.py's defaults)."""

    ours: str
    module: str
    cls: str
    cfg_file: str | None
    ours_config: dict = {}  # never mutated
    cfg_overrides: tuple = ()  # extra (KEY, value) pairs for their cfg
    augment_attr: str | None = None  # their attribute holding the batch augmentation
    stochastic: bool = False
    per_image: bool = False  # MEMO, TTAug: views of one image at a time
    shared_config: dict = {}  # metatta overrides in shared mode only (CoTTA: the loop of views)
    their_optimizer: str | None = None  # what their code builds whatever OPTIM.METHOD says (SAR: SGD)


METHODS: dict[str, MethodPair] = {
    "source": MethodPair("source", "methods.source", "Source", "source"),
    "bn": MethodPair("bn", "methods.norm", "BNTest", "norm_test"),
    "tent": MethodPair("tent", "methods.tent", "Tent", "tent"),
    "rpl": MethodPair("rpl", "methods.rpl", "RPL", "rpl"),
    "lame": MethodPair("lame", "methods.lame", "LAME", "lame"),
    "roid": MethodPair("roid", "methods.roid", "ROID", "roid", augment_attr="tta_transform", stochastic=True),
    "cmf": MethodPair("cmf", "methods.cmf", "CMF", "cmf", augment_attr="tta_transform", stochastic=True),
    "santa": MethodPair("santa", "methods.santa", "SANTA", "santa", augment_attr="tta_transform", stochastic=True),
    "rmt": MethodPair("rmt", "methods.rmt", "RMT", "rmt", augment_attr="tta_transform", stochastic=True),
    "rotta": MethodPair("rotta", "methods.rotta", "RoTTA", "rotta", augment_attr="transform", stochastic=True),
    "memo": MethodPair("memo", "methods.memo", "MEMO", "memo", cfg_overrides=(("OPTIM.NESTEROV", False),),
                       stochastic=True, per_image=True),
    "ttaug": MethodPair("ttaug", "methods.ttaug", "TTAug", None, cfg_overrides=(("MODEL.ADAPTATION", "ttaug"),),
                        stochastic=True, per_image=True),
    # metatta's EATA/ETA defaults are the paper's CIFAR-10 ones (SGD, lr 0.005); their cfg: Adam 1e-3
    "eata": MethodPair("eata", "methods.eata", "EATA", "eata", ours_config={"optimizer": "adam", "lr": 1e-3}),
    "eta": MethodPair("eta", "methods.eata", "EATA", "eta", ours_config={"optimizer": "adam", "lr": 1e-3}),
    # their SAR: SAM around SGD (momentum OPTIM.MOMENTUM) at OPTIM.LR whatever OPTIM.METHOD says; their
    # name rule ('layer4' in the module name) excludes nothing on this ResNet, and their reset() clears
    # the EMA (the authors' recovery keeps it): metatta set alike (docstring)
    "sar": MethodPair("sar", "methods.sar", "SAR", "sar",
                      ours_config={"lr": 1e-3, "excluded_modules": [], "clear_ema_on_recovery": True},
                      their_optimizer="sgd"),
    "cotta": MethodPair("cotta", "methods.cotta", "CoTTA", "cotta", augment_attr="transform", stochastic=True,
                        shared_config={"batched_views": False}),
    # metatta's deyo_cifar.yaml (their cfg's Adam 1e-3); their 'layer4' rule excludes nothing here (SAR).
    # The patch shuffle draws torch.rand(B', 16) from the global generator on both sides: one seed
    "deyo": MethodPair("deyo", "methods.deyo", "DeYO", "deyo",
                       ours_config={"optimizer": "adam", "lr": 1e-3, "excluded_modules": []}),
    "bn_alpha": MethodPair("bn", "methods.norm", "BNAlpha", "norm_alpha", ours_config={"statistics": "alpha"}),
    "bn_ema": MethodPair("bn", "methods.norm", "BNEMA", "norm_ema", ours_config={"statistics": "ema"}),
    # RDumb: their EATA with FISHER_ALPHA 0 and MODEL.RESET_AFTER_NUM_UPDATES; metatta's eta with reset_every
    # (configs/methods/eta_rdumb_cifar.yaml)
    "rdumb": MethodPair("eta", "methods.eata", "EATA", "rdumb",
                        ours_config={"optimizer": "adam", "lr": 1e-3, "reset_every": 1000}),
}
# Resets a method makes by itself (a recovery, a schedule): metatta's counter attribute per pair.
SELF_RESETS = {"sar": "recoveries", "rdumb": "scheduled_resets"}

# metatta config field -> their cfg key, per method, for `config_mismatches`.
CONFIG_KEYS: dict[str, dict[str, str]] = {
    "common": {"lr": "OPTIM.LR", "weight_decay": "OPTIM.WD"},
    "rotta": {"memory_size": "ROTTA.MEMORY_SIZE", "update_frequency": "ROTTA.UPDATE_FREQUENCY", "nu": "ROTTA.NU",
              "alpha": "ROTTA.ALPHA", "lambda_t": "ROTTA.LAMBDA_T", "lambda_u": "ROTTA.LAMBDA_U"},
    "rmt": {"teacher_momentum": "M_TEACHER.MOMENTUM", "lambda_ce_trg": "RMT.LAMBDA_CE_TRG",
            "lambda_cont": "RMT.LAMBDA_CONT", "lambda_ce_src": "RMT.LAMBDA_CE_SRC",
            "temperature": "CONTRAST.TEMPERATURE", "projection_dim": "CONTRAST.PROJECTION_DIM",
            "warmup_samples": "RMT.NUM_SAMPLES_WARM_UP"},
    "santa": {"lambda_ce_trg": "SANTA.LAMBDA_CE_TRG", "lambda_cont": "SANTA.LAMBDA_CONT",
              "temperature": "CONTRAST.TEMPERATURE", "projection_dim": "CONTRAST.PROJECTION_DIM"},
    "roid": {"use_weighting": "ROID.USE_WEIGHTING", "use_prior_correction": "ROID.USE_PRIOR_CORRECTION",
             "use_consistency": "ROID.USE_CONSISTENCY", "momentum_src": "ROID.MOMENTUM_SRC",
             "momentum_probs": "ROID.MOMENTUM_PROBS", "temperature": "ROID.TEMPERATURE"},
    "cmf": {"use_weighting": "ROID.USE_WEIGHTING", "use_prior_correction": "ROID.USE_PRIOR_CORRECTION",
            "use_consistency": "ROID.USE_CONSISTENCY", "momentum_probs": "ROID.MOMENTUM_PROBS",
            "temperature": "ROID.TEMPERATURE", "alpha": "CMF.ALPHA", "gamma": "CMF.GAMMA", "q": "CMF.Q"},
    "rpl": {"q": "RPL.Q"},
    "lame": {"affinity": "LAME.AFFINITY", "knn": "LAME.KNN", "force_symmetry": "LAME.FORCE_SYMMETRY"},
    "memo": {"num_augmentations": "TEST.N_AUGMENTATIONS", "bn_alpha": "BN.ALPHA", "momentum": "OPTIM.MOMENTUM"},
    "ttaug": {"num_augmentations": "TEST.N_AUGMENTATIONS", "bn_alpha": "BN.ALPHA"},
    "eata": {"entropy_factor": "EATA.MARGIN_E0", "d_margin": "EATA.D_MARGIN", "fisher_alpha": "EATA.FISHER_ALPHA",
             "use_fisher": "EATA.FISHER_ALPHA > 0 and SOURCE.NUM_SAMPLES > 0"},
    "eta": {"entropy_factor": "EATA.MARGIN_E0", "d_margin": "EATA.D_MARGIN",
            "use_fisher": "EATA.FISHER_ALPHA > 0 and SOURCE.NUM_SAMPLES > 0"},
    "sar": {"momentum": "OPTIM.MOMENTUM", "entropy_factor": "EATA.MARGIN_E0", "reset_threshold": "SAR.RESET_CONSTANT_EM"},
    "cotta": {"teacher_momentum": "M_TEACHER.MOMENTUM", "restore_prob": "COTTA.RST", "aug_threshold": "COTTA.AP",
              "num_augmentations": "TEST.N_AUGMENTATIONS"},
    "deyo": {"entropy_factor": "DEYO.MARGIN", "reweight_factor": "EATA.MARGIN_E0", "plpd_threshold": "DEYO.PLPD",
             "reweight_entropy": "DEYO.REWEIGHT_ENT", "reweight_plpd": "DEYO.REWEIGHT_PLPD",
             "augmentation": "DEYO.AUG_TYPE ('occ': occlusion)", "patch_grid": "DEYO.PATCH_LEN"},
    "bn_alpha": {"alpha": "BN.ALPHA"},
    "rdumb": {"entropy_factor": "EATA.MARGIN_E0", "d_margin": "EATA.D_MARGIN",
              "use_fisher": "EATA.FISHER_ALPHA > 0 and SOURCE.NUM_SAMPLES > 0",
              "reset_every": "MODEL.RESET_AFTER_NUM_UPDATES"},
}
# Values their code fixes (not in their cfg), per method: metatta field -> their constant.
CODE_CONSTANTS: dict[str, dict[str, Any]] = {
    "eata": {"probs_momentum": 0.9},  # update_model_probs
    "eta": {"probs_momentum": 0.9},
    "rdumb": {"probs_momentum": 0.9},
    "sar": {"rho": 0.05, "adaptive": False, "ema_momentum": 0.9,  # SAM(...) defaults, update_ema
            "clear_ema_on_recovery": True},  # their SAR.reset() sets self.ema = None
    "cotta": {"symmetric_loss": False},  # softmax_entropy_cifar for a "cifar" dataset name
    "deyo": {"filter_entropy": True, "filter_plpd": True},  # their loss_calculation always filters
    "bn_ema": {"ema_momentum": None},  # their EMABatchNorm: each layer's own momentum
}
# Derived values of their cfg that a config field mirrors (a key of CONFIG_KEYS that is not a path).
DERIVED_KEYS: dict[str, Callable[[Any], Any]] = {
    "EATA.FISHER_ALPHA > 0 and SOURCE.NUM_SAMPLES > 0":
        lambda cfg: cfg.EATA.FISHER_ALPHA > 0 and cfg.SOURCE.NUM_SAMPLES > 0,
    "DEYO.AUG_TYPE ('occ': occlusion)": lambda cfg: {"occ": "occlusion"}.get(cfg.DEYO.AUG_TYPE, cfg.DEYO.AUG_TYPE),
}
OPTIMIZER_NAMES = {"Adam": "adam", "SGD": "sgd", "AdamW": "adamw"}


# ---- pieces that need no checkout ---------------------------------------------------------------
class PooledFeatures(nn.Module):
    """The ResNet up to the classifier: pooled, flattened features (what `fc` takes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pool(self.model.forward_features(x)).flatten(1)


def split_up_model(model: nn.Module, arch_name: str = "", dataset_name: str = "") -> tuple[nn.Module, nn.Module]:
    """Their `split_up_model` for metatta's ResNet: (feature extractor, classifier), sharing weights."""
    for name in ("forward_features", "pool", "fc"):
        if not hasattr(model, name):
            raise ValueError(f"split_up_model: the model has no {name!r}; the harness splits metatta's ResNet only")
    return PooledFeatures(model), model.fc


class SourceBatches(list):
    """A list of (images, labels) batches with the `batch_size` their code reads off a loader."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(batches)
        self.batch_size = int(batches[0][0].shape[0]) if batches else 0


def source_batches(batch_size: int, count: int = SOURCE_IMAGES, seed: int = 0) -> SourceBatches:
    """Labelled clean training batches, as metatta's experiment builds `source_batches`."""
    images, labels = load_clean("fashion_mnist", "train")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count].numpy()
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div(255)
    y = torch.as_tensor(labels[idx]).long()
    return SourceBatches([(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def config_mismatches(method: str, ours: Any, theirs: Any, adapts: bool = True,
                      their_optimizer: str | None = None) -> list[str]:
    """Where metatta's config (a dataclass) and their cfg (a yacs node) disagree for `method`
    (the optimizer's fields only where the method `adapts` parameters; `their_optimizer`: the one
    their code builds whatever OPTIM.METHOD says), and where it differs from a constant of their code."""
    def lookup(key: str) -> Any:
        if key in DERIVED_KEYS:
            return DERIVED_KEYS[key](theirs)
        node = theirs
        for part in key.split("."):
            node = getattr(node, part)
        return node

    out = []
    optimizer = adapts and getattr(ours, "optimizer", None) in ("sgd", "adam")
    keys = {"episodic": "MODEL.EPISODIC", **(CONFIG_KEYS["common"] if optimizer else {}), **CONFIG_KEYS.get(method, {})}
    if optimizer:
        theirs_opt = their_optimizer or OPTIMIZER_NAMES.get(lookup("OPTIM.METHOD"), lookup("OPTIM.METHOD"))
        if theirs_opt != ours.optimizer:
            out.append(f"optimizer: ours {ours.optimizer}, theirs {theirs_opt}")
        if ours.optimizer == "adam" and tuple(ours.betas)[0] != lookup("OPTIM.BETA"):
            out.append(f"betas[0]: ours {ours.betas[0]}, theirs {lookup('OPTIM.BETA')}")
    for field, key in keys.items():
        a, b = getattr(ours, field), lookup(key)
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        else:
            same = a == b
        if not same:
            out.append(f"{field}: ours {a!r}, theirs {key} {b!r}")
    for field, value in CODE_CONSTANTS.get(method, {}).items():
        if getattr(ours, field) != value:
            out.append(f"{field}: ours {getattr(ours, field)!r}, their code {value!r}")
    return out


def adapted_parameter_names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """The names in `model` of the tensors in `params` (what an optimizer updates), in model order."""
    ids = {id(p) for p in params}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def error(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(1) != labels).sum())


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per-corruption errors of `runs` = {"ours": [per-seed {corruption: error}], "theirs": [...]}:
    the mean and (min, max) over seeds of each side, the largest |mean difference| over corruptions."""
    corruptions = list(runs["ours"][0])
    rows = []
    for c in corruptions:
        row = {"corruption": c}
        for side in ("ours", "theirs"):
            values = [r[c] for r in runs[side]]
            row[side] = float(np.mean(values))
            row[f"{side}_range"] = (float(min(values)), float(max(values)))
        row["difference"] = row["ours"] - row["theirs"]
        rows.append(row)
    mean = {side: float(np.mean([r[side] for r in rows])) for side in ("ours", "theirs")}
    return {"rows": rows, "mean": mean, "max_abs_difference": max(abs(r["difference"]) for r in rows)}


class Clock:
    """Seconds spent by each side."""

    def __init__(self):
        self.seconds = {"ours": 0.0, "theirs": 0.0}

    @contextlib.contextmanager
    def timing(self, side: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[side] += time.perf_counter() - start


# ---- the reference code ------------------------------------------------------------------------
def _package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def load_reference(checkout: Path, source_loader: Callable[..., Any]) -> types.ModuleType:
    """Make their classification/ importable with the shims of the module docstring; returns
    their conf module."""
    root = checkout / "classification"
    if not (root / "methods" / "base.py").is_file() or not (root / "conf.py").is_file():
        raise FileNotFoundError(f"--reference-repo: no classification/methods/base.py and conf.py under {checkout}")
    try:
        importlib.import_module("yacs.config")
    except ImportError as exc:
        raise ImportError("the reference code needs yacs (pip install yacs)") from exc
    sys.path.insert(0, str(root))
    for name in ("methods", "augmentations", "utils", "datasets", "models"):
        _package(name, root / name)
    model_module = types.ModuleType("models.model")
    model_module.split_up_model = split_up_model
    model_module.ResNetDomainNet126 = type("ResNetDomainNet126", (nn.Module,), {})
    sys.modules["models.model"] = model_module
    loading = types.ModuleType("datasets.data_loading")
    loading.get_source_loader = source_loader
    sys.modules["datasets.data_loading"] = loading
    file_io = types.ModuleType("iopath.common.file_io")
    file_io.g_pathmgr = types.SimpleNamespace(open=open, mkdirs=lambda p: os.makedirs(p, exist_ok=True))
    for name in ("iopath", "iopath.common"):
        _package(name, root)
    sys.modules["iopath.common.file_io"] = file_io
    conf = importlib.import_module("conf")
    augmix = importlib.import_module("augmentations.transforms_augmix")
    augmix.get_preaugment = cifar_preaugment  # their CIFAR recipe at 28 pixels (docstring)
    return conf


def cifar_preaugment(dataset_name: str, crop_size: int = 224):
    return transforms.Compose([transforms.RandomCrop(crop_size, padding=4), transforms.RandomHorizontalFlip()])


def reference_cfg(conf: types.ModuleType, checkout: Path, pair: MethodPair, batch_size: int, ckpt_dir: str):
    cfg = conf._CFG_DEFAULT.clone()
    cfg.defrost()
    if pair.cfg_file is not None:
        cfg.merge_from_file(str(checkout / "classification" / "cfgs" / "cifar10_c" / f"{pair.cfg_file}.yaml"))
    # MODEL.EPISODIC stays their file's: their reset before every batch is MEMO's per-image reset;
    # the project's episodic setting (a reset per corruption) is done by the harness on both sides
    opts = ["TEST.BATCH_SIZE", batch_size, "CKPT_DIR", ckpt_dir,
            "SOURCE.NUM_WORKERS", 0]
    for key, value in pair.cfg_overrides:
        opts += [key, value]
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


@contextlib.contextmanager
def cuda_calls_on_cpu() -> Iterator[None]:
    """`.cuda()` returns the tensor itself while building on a machine without CUDA (CMF)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def build_reference(conf, checkout: Path, pair: MethodPair, model: nn.Module, batch_size: int, ckpt_dir: str):
    module = importlib.import_module(pair.module)
    cls = getattr(module, pair.cls)
    if pair.cls == "RoTTA" and "x" not in cls.loss_calculation.__code__.co_varnames[:2]:
        original = cls.loss_calculation
        cls.loss_calculation = lambda self, *unused: original(self)  # their HEAD's TypeError (docstring)
    model.model_preprocess = transforms.Compose([transforms.CenterCrop(28)])
    cfg = reference_cfg(conf, checkout, pair, batch_size, ckpt_dir)
    with cuda_calls_on_cpu():
        return cls(cfg, model, NUM_CLASSES), cfg


loaders: list[SourceBatches] = []  # the source batches get_source_loader hands out next


def reference_source_loader(**kwargs) -> tuple[None, SourceBatches]:
    """Their `get_source_loader` for RMT/SANTA: the batches the running comparison made."""
    if not loaders:
        raise RuntimeError("get_source_loader called with no source batches prepared")
    return None, loaders[0]


# ---- one comparison -------------------------------------------------------------------------------
def per_image_views(x: torch.Tensor, uint8_images: np.ndarray, mode: str, views: int, augmenter) -> list[list[torch.Tensor]]:
    """MEMO/TTAug inputs for their code: per image [image, view_1, ..., view_n], each (1, C, H, W)."""
    out = []
    for i in range(x.shape[0]):
        if mode == "shared":
            made = augmix_views(x[i], views)
            out.append([x[i:i + 1]] + [v.unsqueeze(0) for v in made])
        else:
            img = uint8_images[i]
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            out.append([t.unsqueeze(0) for t in augmenter(pil)])
    return out


def run_pair(name: str, setting: str, batch_size: int, mode: str, seed: int, *, conf, checkout: Path,
             source: nn.Module, domains, warmup_samples: int, channels_last: bool,
             ours_set: dict | None = None, theirs_set: dict | None = None) -> dict[str, Any]:
    """One method on one setting; `ours_set`: metatta config fields set over the pair's, `theirs_set`:
    their cfg keys over their file's (a what-if, or both set alike; config mismatches name what differs)."""
    pair = METHODS[name]
    batches = source_batches(batch_size)
    # scale_lr off: their code uses the cfg's lr at any batch size (metatta's runners scale it down
    # linearly below the method's published batch, e.g. to 0.32x at batch 64 for Tent, RPL, ROID)
    overrides = {"channels_last": channels_last, "scale_lr": False, **pair.ours_config,
                 **(pair.shared_config if mode == "shared" else {}), **(ours_set or {})}
    context = {}
    if name in ("rmt", "santa"):
        context["source_batches"] = list(batches)
    if name == "rmt":
        overrides["warmup_samples"] = warmup_samples
    extra = [("RMT.NUM_SAMPLES_WARM_UP", warmup_samples)] if name == "rmt" else []
    extra += list((theirs_set or {}).items())
    pair_run = pair._replace(cfg_overrides=pair.cfg_overrides + tuple(extra))
    with tempfile.TemporaryDirectory() as ckpt_dir:
        fisher_images = reference_cfg(conf, checkout, pair_run, batch_size, ckpt_dir).SOURCE.NUM_SAMPLES
        if name == "eata":
            # their Fisher loader: SOURCE.NUM_SAMPLES (2,000) clean images at the test batch size
            batches = source_batches(batch_size, count=fisher_images)
            context["fisher_batches"] = [x for x, _ in batches]
        seed_everything(seed)
        ours = build_method(pair.ours, copy.deepcopy(source), overrides, batch_size=batch_size, **context)
        loaders[:] = [batches]
        seed_everything(seed)
        theirs, cfg = build_reference(conf, checkout, pair_run, copy.deepcopy(source), batch_size, ckpt_dir)
    mismatches = config_mismatches(name, ours.config, cfg, adapts=ours.optimizer is not None,
                                   their_optimizer=pair.their_optimizer)
    if ours.optimizer is not None and getattr(theirs, "optimizer", None) is not None:
        names = {side: adapted_parameter_names(m.model, [p for g in m.optimizer.param_groups for p in g["params"]])
                 for side, m in (("ours", ours), ("theirs", theirs))}
        # their AlphaBatchNorm (MEMO, TTAug) holds the BatchNorm it replaces as `.layer`
        names["theirs"] = [n.replace(".layer.", ".") for n in names["theirs"]]
        if names["ours"] != names["theirs"]:
            mismatches.append(f"adapted parameters: ours {names['ours']}, theirs {names['theirs']}")
    if hasattr(theirs, "projector") and hasattr(ours, "projector"):
        # same starting projector (each side draws its own at construction)
        theirs.projector.load_state_dict(ours.projector.state_dict())
        theirs.model_states, theirs.optimizer_state = theirs.copy_model_and_optimizer()
    if mode == "shared" and pair.augment_attr:
        setattr(theirs, pair.augment_attr, roid_augment if name in ("roid", "cmf") else ours.augment)
    augmenter = None
    if pair.per_image and mode == "own":
        augmix = importlib.import_module("augmentations.transforms_augmix")
        augmenter = augmix.AugMixAugmenter(transforms.Compose([transforms.CenterCrop(28)]), transforms.ToTensor(),
                                           dataset_name="cifar10_c", n_views=cfg.TEST.N_AUGMENTATIONS,
                                           use_augmix=True, severity=1)
    their_resets = count_resets_in_forward(theirs) if name in SELF_RESETS else None
    stream = build_stream(domains, setting, batch_size, seed=0)
    by_name = {d.name: d for d in domains}
    clock, wrong, counts, differ = Clock(), {}, {}, {}
    current, step = None, 0
    for batch in stream:
        if batch.domain != current:
            current = batch.domain
            wrong[current], counts[current], differ[current] = {"ours": 0, "theirs": 0}, 0, 0
            if stream.resets_per_domain:
                ours.reset()
                theirs.reset()
        rows = stream_rows(stream, batch, step)
        order = ("ours", "theirs") if step % 2 == 0 else ("theirs", "ours")
        outputs = {}
        for side in order:
            seed_everything(seed * 1_000_003 + step)
            with clock.timing(side):
                if side == "ours":
                    outputs[side] = ours(batch.x).detach()
                elif pair.per_image:
                    images = by_name[batch.domain].images[rows] if mode == "own" else None
                    inputs = per_image_views(batch.x, images, mode, cfg.TEST.N_AUGMENTATIONS, augmenter)
                    outputs[side] = torch.cat([theirs(item).detach() for item in inputs])
                else:
                    outputs[side] = theirs([batch.x]).detach()
        for side in ("ours", "theirs"):
            wrong[current][side] += error(outputs[side], batch.y)
        differ[current] += int((outputs["ours"].argmax(1) != outputs["theirs"].argmax(1)).sum())
        counts[current] += len(batch.y)
        step += 1
    images = sum(counts.values())
    out = {"errors": {side: {d: 100 * wrong[d][side] / counts[d] for d in counts} for side in ("ours", "theirs")},
           "predictions_differing": differ, "images": images,
           "images_per_second": {k: images / v for k, v in clock.seconds.items()},
           "config_mismatches": mismatches}
    if their_resets is not None:  # SAR's model recovery, RDumb's schedule: exercised or not
        out["self_resets"] = {"ours": getattr(ours, SELF_RESETS[name]), "theirs": their_resets["count"]}
    return out


def count_resets_in_forward(method: nn.Module) -> dict[str, int]:
    """Count the `reset()` calls `method` makes inside its own forward (SAR's recovery), not the
    harness's resets at corruption boundaries; wraps the instance's bound methods, not their class."""
    counter = {"count": 0, "inside": 0}
    reset, forward = method.reset, method.forward

    def counting_reset(*args, **kwargs):
        counter["count"] += counter["inside"]
        return reset(*args, **kwargs)

    def marked_forward(*args, **kwargs):
        counter["inside"] = 1
        try:
            return forward(*args, **kwargs)
        finally:
            counter["inside"] = 0

    method.reset, method.forward = counting_reset, marked_forward
    return counter


def stream_rows(stream, batch, step: int) -> np.ndarray:
    """The domain rows of the `step`-th batch (for their PIL views)."""
    seen = 0
    for segment in stream.segments:
        for start in range(0, len(segment), stream.batch_size):
            if seen == step:
                return segment.rows[start:start + stream.batch_size]
            seen += 1
    raise IndexError(step)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", type=Path, required=True)
    parser.add_argument("--benchmark-root", type=Path, default=cache_root() / "fashion_mnist_c-n10000-s0-v2")
    parser.add_argument("--checkpoint", type=Path, default=cache_root() / "models" / "resnet_fmnist.pt")
    parser.add_argument("--corruptions", nargs="+", default=list(DEFAULT_CORRUPTIONS))
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=[f"{s}:{b}" for s, b in SETTINGS])
    parser.add_argument("--modes", nargs="+", default=["shared", "own"], choices=["shared", "own"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--warmup-samples", type=int, default=50000, help="RMT's warm-up (both sides)")
    parser.add_argument("--channels-last", action="store_true", help="metatta's NHWC layout (faster on CPU)")
    parser.add_argument("--ours-set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="metatta config fields over the pair's (YAML values), e.g. clear_ema_on_recovery=false")
    parser.add_argument("--theirs-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="their cfg keys over their file's (YAML values), e.g. MODEL.RESET_AFTER_NUM_UPDATES=2")
    parser.add_argument("--tag", default="fidelity_methods")
    args = parser.parse_args(argv)

    conf = load_reference(args.reference_repo, reference_source_loader)
    source = load_source_model(args.checkpoint)
    domains = read_cifar_c(args.benchmark_root, args.corruptions, [5], num_images=args.num_images)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings]
    record = {"protocol": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    for name in args.methods:
        pair = METHODS[name]
        for setting, batch_size in (settings[:1] if pair.per_image else settings):
            for mode in (args.modes if pair.stochastic else ["shared"]):
                seeds = args.seeds if (pair.stochastic and mode == "own") else args.seeds[:1]
                runs = [run_pair(name, setting, batch_size, mode, s, conf=conf, checkout=args.reference_repo,
                                 source=source, domains=domains, warmup_samples=args.warmup_samples,
                                 ours_set=parse_assignments(args.ours_set),
                                 theirs_set=parse_assignments(args.theirs_set),
                                 channels_last=args.channels_last) for s in seeds]
                summary = summarize({side: [r["errors"][side] for r in runs] for side in ("ours", "theirs")})
                speed = {side: float(np.mean([r["images_per_second"][side] for r in runs])) for side in ("ours", "theirs")}
                entry = {"method": name, "setting": setting, "batch_size": batch_size, "mode": mode, "seeds": seeds,
                         "summary": summary, "images_per_second": speed, "runs": runs,
                         "config_mismatches": runs[0]["config_mismatches"]}
                record["runs"].append(entry)
                write_results(record, args.tag)
                print(json.dumps({k: entry[k] for k in ("method", "setting", "mode", "images_per_second")}
                                 | {"mean": summary["mean"], "max_diff": summary["max_abs_difference"],
                                    "differing": runs[0]["predictions_differing"]}), flush=True)
    return record


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """FIELD=VALUE strings (--ours-set, --theirs-set) -> {field: YAML-parsed value}."""
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--ours-set/--theirs-set: expected FIELD=VALUE, got {item!r}")
        out[field] = yaml.safe_load(value)
    return out


def write_results(record: dict, tag: str) -> None:
    """The JSON and markdown so far (rewritten after every comparison, so a long run keeps what it did)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(record, indent=1, default=str))
    (RESULTS / f"{tag}.md").write_text(report(record))


def report(record: dict) -> str:
    summary_rows, detail = [], []
    for e in record["runs"]:
        s, speed = e["summary"], e["images_per_second"]
        label = f"{e['method']} ({e['setting']} b{e['batch_size']}, {e['mode']}" + (
            f", {len(e['seeds'])} seeds)" if len(e["seeds"]) > 1 else ")")
        summary_rows.append([label, f"{s['mean']['ours']:.1f}", f"{s['mean']['theirs']:.1f}",
                             f"{s['max_abs_difference']:.1f}", f"{speed['ours']:.0f}", f"{speed['theirs']:.0f}",
                             f"{speed['ours'] / speed['theirs']:.2f}"])
        rows = []
        for r in s["rows"]:
            spread = lambda side: (f" ({r[f'{side}_range'][0]:.1f}-{r[f'{side}_range'][1]:.1f})"  # noqa: E731
                                   if len(e["seeds"]) > 1 else "")
            rows.append([r["corruption"], f"{r['ours']:.1f}{spread('ours')}", f"{r['theirs']:.1f}{spread('theirs')}",
                         f"{r['difference']:+.1f}", e["runs"][0]["predictions_differing"][r["corruption"]]])
        detail.append(f"### {label}\n\n" + markdown_table(
            ["corruption", "metatta", "reference", "difference", "predictions differing (seed 1st)"], rows)
            + ("\n\nConfig mismatches: " + "; ".join(e["config_mismatches"]) if e["config_mismatches"] else "")
            + ("\n\nResets the method made itself (SAR: recoveries, RDumb: its schedule; seed 1st): metatta {ours}, "
               "reference {theirs}".format(**e["runs"][0]["self_resets"]) if "self_resets" in e["runs"][0] else ""))
    head = markdown_table(["method", "metatta", "reference", "max per-corruption |diff|", "img/s metatta",
                           "img/s reference", "speed ratio"], summary_rows)
    return head + "\n\n" + "\n\n".join(detail) + "\n"


if __name__ == "__main__":
    main()
