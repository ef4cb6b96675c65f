"""An encoder with several heads, built from a source classifier, and its adapter files.

`split_classifier(model)` cuts a source model at its last `nn.Linear` (the
classifier, applied to the pooled features in every model metatta builds):
a copy of the model with that layer replaced by the identity is the encoder.

`MultiHeadNet(encoder, classifier, heads)` runs the encoder once and one head:
`net(x)` gives class logits, `net(x, head="projector")` SimCLR projections,
`net(x, head="rotation")` rotation logits. Everything goes through
`forward`, so a forward hook on the network sees every output (the
non-finite guard's tests rely on that).

Adapter directory (the layout `metatta.tracking.register_adapter` registers):
`weights.pt`, the network's state dict (loaded with weights_only=True), and
`adapter.json`: {"kind": "cta" | "ttt", "source_model": how to rebuild the
source architecture, "heads": {name: [in, hidden, out]}, "augmentation":
{"hflip": bool} (what the network was trained with; absent in adapters written
before it was recorded), plus what training adds (the source checkpoint's path
and sha256, the training config, the validation error)}.

A network carries that record as `net.trained_augmentation` (a plain dict, {}
when unknown), so a test-time method that augments as in training (CTA) does
what the network was trained with: no mirror on a dataset whose classes a
mirror changes (digits), without the method knowing the dataset.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from metatta.models import build_model
from metatta.safe_files import read_json_file, read_state_dict
from metatta.ssl.simclr import MLPHead

CLASSIFIER = "classifier"
WEIGHTS_FILE = "weights.pt"  # = metatta.tracking.ADAPTER_WEIGHTS (tracking imports MLflow lazily; no cycle)
CONFIG_FILE = "adapter.json"  # = metatta.tracking.ADAPTER_CONFIG
AUGMENTATION = "augmentation"  # adapter.json's record of the training augmentation


def split_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(encoder, classifier): copies of `model` without its last Linear layer, and that layer."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to split off")
    encoder = copy.deepcopy(model)
    parent_name, _, attr = linears[-1].rpartition(".")
    parent = encoder.get_submodule(parent_name) if parent_name else encoder
    classifier = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return encoder, classifier


class MultiHeadNet(nn.Module):
    """encoder -> classifier, or encoder -> a named head (see the module docstring)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Linear, heads: Mapping[str, nn.Module]):
        super().__init__()
        if CLASSIFIER in heads:
            raise ValueError(f"MultiHeadNet: head name {CLASSIFIER!r} is reserved for the classifier")
        self.encoder = encoder
        self.classifier = classifier
        self.heads = nn.ModuleDict(dict(heads))
        # how the network was trained to see images ({"hflip": bool}); {}: not recorded
        self.trained_augmentation: dict[str, Any] = {}

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def head(self, name: str) -> nn.Module:
        if name == CLASSIFIER:
            return self.classifier
        if name not in self.heads:
            raise KeyError(f"MultiHeadNet has no head {name!r}; heads: {[CLASSIFIER, *self.heads]}")
        return self.heads[name]

    def forward(self, x: torch.Tensor, head: str = CLASSIFIER) -> torch.Tensor:
        return self.head(head)(self.encoder(x))

    def head_dims(self) -> dict[str, list[int]]:
        return {name: list(h.dims) for name, h in self.heads.items()}


def build_network(source: nn.Module, head_dims: Mapping[str, Any]) -> MultiHeadNet:
    """A MultiHeadNet from a source classifier: its encoder and classifier, plus new MLP heads
    ({name: [hidden, out]} or [in, hidden, out]; `in` is the encoder's feature size)."""
    encoder, classifier = split_classifier(source)
    heads = {}
    for name, dims in head_dims.items():
        dims = list(dims)
        hidden, out = dims[-2:]
        heads[name] = MLPHead(classifier.in_features, int(hidden), int(out))
    return MultiHeadNet(encoder, classifier, heads)


def source_model_info(header: Mapping[str, Any]) -> dict[str, Any]:
    """What `metatta.models.build_model` needs to rebuild a source checkpoint's architecture."""
    kwargs = {k: v for k, v in header["model_kwargs"].items() if k != "checkpoint"}
    return {"model": header["model"], "model_kwargs": kwargs, "num_classes": header["num_classes"],
            "in_channels": header["in_channels"]}


def save_network(net: MultiHeadNet, directory: str | Path, kind: str, source_model: Mapping[str, Any],
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write an adapter directory (weights.pt + adapter.json) for `net`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    info = {"kind": kind, "source_model": dict(source_model), "heads": net.head_dims(), **dict(extra or {})}
    if net.trained_augmentation:
        info[AUGMENTATION] = dict(net.trained_augmentation)
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str))
    return directory


def load_network(directory: str | Path, kind: str | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[MultiHeadNet, dict[str, Any]]:
    """(network, adapter info) from an adapter directory; weights are read with weights_only=True."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"adapter directory {directory} lacks {name}")
    info = read_json_file(directory / CONFIG_FILE, f"adapter {directory}:")
    if kind is not None and info.get("kind") != kind:
        raise ValueError(f"adapter {directory} is a {info.get('kind')!r} adapter, not {kind!r}")
    arch = info["source_model"]
    source = build_model(arch["model"], arch["num_classes"], arch["in_channels"], **arch["model_kwargs"])
    net = build_network(source, info["heads"])
    state = read_state_dict(directory / WEIGHTS_FILE, f"adapter {directory}:", map_location)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"adapter {directory}: weights do not fit its {arch['model']} network: {e}") from None
    net.trained_augmentation = _augmentation_record(info, directory)
    return net.eval(), info


def _augmentation_record(info: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """adapter.json's "augmentation", checked ({} when absent: an adapter written before the record)."""
    record = info.get(AUGMENTATION, {})
    if not isinstance(record, dict) or not isinstance(record.get("hflip", False), bool):
        raise ValueError(f"adapter {directory}: {CONFIG_FILE} field {AUGMENTATION!r} must be "
                         f'{{"hflip": true|false}}, got {record!r}')
    return dict(record)
