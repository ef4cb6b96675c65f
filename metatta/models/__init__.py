"""Source networks by name.

    build_model("resnet_fmnist", num_classes=10, in_channels=1)
    build_model("wrn28_10", 10, 3)
    build_model("timm:resnet18", 10, 3, checkpoint="weights.safetensors")
    build_model("torchvision:resnet18", 1000, 3)
    load_source_model(Path.home() / ".cache/metatta/models/resnet_fmnist.pt")  # metatta.paths.models_dir()

Every model takes images in [0, 1] and normalizes inside itself. Registered
names come with defaults that keyword arguments override (e.g.
`widths=[32, 64, 128]`). `timm:<name>` and `torchvision:<name>` build any model
of those libraries with random weights (never from a hub), wrap it with the
input normalization, and load a local weights file if `checkpoint=` is given.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from metatta.models.checkpoint import load_checkpoint
from metatta.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, NormalizedModel, default_stats
from metatta.models.resnet import ResNet
from metatta.models.vit import ViTClassifier
from metatta.models.wideresnet import WideResNet

log = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    # The Fashion-MNIST source model: a ResNet-8 that trains to < 10% error in minutes on 2 CPU cores.
    "resnet_fmnist": functools.partial(ResNet, blocks=(1, 1, 1), widths=(16, 32, 64)),
    "resnet8": functools.partial(ResNet, blocks=(1, 1, 1), widths=(16, 32, 64)),
    "resnet20_cifar": functools.partial(ResNet, blocks=(3, 3, 3), widths=(16, 32, 64)),
    "resnet26_cifar": functools.partial(ResNet, blocks=(4, 4, 4), widths=(16, 32, 64)),
    "resnet18_cifar": functools.partial(ResNet, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    # RobustBench CIFAR-10 "Standard" and the WRN-40-2 shape; identity normalization by default (RobustBench's
    # Hendrycks2020AugMix_WRN wants mean=[0.5] * 3, std=[0.5] * 3).
    "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
    "wrn40_2": functools.partial(WideResNet, depth=40, widen_factor=2),
    "wrn16_4": functools.partial(WideResNet, depth=16, widen_factor=4),
    # Small LayerNorm ViT for 28x28 (MGTTA's setting scaled down).
    "vit_tiny_fmnist": lambda **kw: ViTClassifier(**{"img_size": 28, "patch_size": 4, "embed_dim": 128, "depth": 6,
                                                     "num_heads": 4, **kw}),
}
PREFIXES = ("timm:", "torchvision:")


def known_models() -> list[str]:
    return sorted(MODEL_REGISTRY) + [f"{p}<name>" for p in PREFIXES]


def build_model(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised model (random weights unless `checkpoint=` is given for timm:/torchvision:)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"build_model({name!r}): in_channels must be a positive integer, got {in_channels!r}")
    if name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), num_classes, in_channels, **kwargs)
    if name.startswith("torchvision:"):
        return _build_torchvision(name.removeprefix("torchvision:"), num_classes, in_channels, **kwargs)
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}")
    try:
        return MODEL_REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise ValueError(f"build_model({name!r}): bad keyword arguments {sorted(kwargs)}: {e}") from None


def _wrap(net: nn.Module, in_channels: int, mean, std, checkpoint: str | Path | None) -> nn.Module:
    if checkpoint is not None:
        load_external_weights(net, checkpoint)
    if mean is None or std is None:
        mean, std = default_stats(in_channels)
    return NormalizedModel(net, mean, std)


def _build_timm(arch: str, num_classes: int, in_channels: int, checkpoint=None, mean=None, std=None, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (see timm.list_models())")
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if (mean is None or std is None) and in_channels == 3:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return _wrap(net, in_channels, mean, std, checkpoint)


def _build_torchvision(arch: str, num_classes: int, in_channels: int, checkpoint=None, mean=None, std=None,
                       **kwargs) -> nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {arch!r} (see torchvision.models.list_models())")
    if in_channels != 3:
        raise ValueError(f"torchvision:{arch} takes 3 input channels, got in_channels={in_channels}; "
                         f"use timm:<name> (it has in_chans) or a registered model")
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if mean is None or std is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return _wrap(net, in_channels, mean, std, checkpoint)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types
        raise ValueError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    # Common wrappers: {"state_dict": ...} (RobustBench, Lightning), {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_external_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain state dict (.pt/.pth via weights-only torch.load, or .safetensors) into `model`.

    Strict, except that a model's own `normalize.*` buffers may be absent from
    the file (foreign checkpoints, e.g. RobustBench's, carry no normalization).
    """
    path = Path(path)
    state = _read_weights_file(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise ValueError(f"weights file {path} does not fit {type(model).__name__}: {e}") from None
    missing = [k for k in result.missing_keys if not k.startswith("normalize.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights file {path} does not fit {type(model).__name__}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}")
    log.info("loaded %d tensors from %s", len(state), path)
    return model


def load_source_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a source checkpoint was saved from, with its weights, in eval mode."""
    state_dict, _, header = load_checkpoint(checkpoint_path, device="cpu")
    kwargs = {k: v for k, v in header["model_kwargs"].items() if k != "checkpoint"}  # initial weights: superseded
    model = build_model(header["model"], header["num_classes"], header["in_channels"], **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"source checkpoint {checkpoint_path} does not fit model {header['model']!r}: {e}") from None
    return model.to(device).eval()


__all__ = [
    "MODEL_REGISTRY", "Normalize", "NormalizedModel", "build_model", "known_models", "load_external_weights",
    "load_source_model",
]
