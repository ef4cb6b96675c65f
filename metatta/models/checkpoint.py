"""Source-model checkpoints: tensors in one file, a JSON header beside it.

A checkpoint is two files:

- `<name>.pt`: `torch.save` of a dict holding only tensors and strings:
  {"format", "state_dict", "feature_stats"}. It is read back with
  `torch.load(..., weights_only=True)`, so loading never unpickles arbitrary
  objects. "feature_stats" holds MGTTA's clean feature statistics
  ("mean.<i>", "std.<i>"; see `metatta.models.feature_stats`).
- `<name>.pt.json`: the header: model name and kwargs (enough for
  `metatta.models.build_model` to rebuild the network), num_classes,
  in_channels, dataset, clean test error, training time, the training config,
  library versions, and the sha256 of the `.pt` file.

`checkpoint_hash(path)` is the sha256 of the `.pt` file, the identity the
evaluation protocol and trained adapters record. Loading checks it against the
header, so a truncated or edited weights file fails with a clear error. Both
files are written to a temporary name and renamed, the weights first, so a
crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from metatta.versions import library_versions

FORMAT = "metatta.source.v1"
HEADER_SUFFIX = ".json"


class CheckpointError(ValueError):
    """A source checkpoint that exists but cannot be used (truncated, edited, wrong format)."""


def header_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + HEADER_SUFFIX)


def checkpoint_hash(path: str | Path) -> str:
    """sha256 (hex) of the checkpoint's weights file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source checkpoint not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    in_channels: int,
    model_kwargs: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    clean_test_error: float | None = None,
    train_time_s: float | None = None,
    feature_stats: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<path>` (tensors) and `<path>.json` (header); returns `path`."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    stats = {k: v.detach().cpu().contiguous() for k, v in (feature_stats or {}).items()}
    payload = {"format": FORMAT, "state_dict": state_dict, "feature_stats": stats}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    header = {
        "format": FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "dataset": dataset,
        "clean_test_error": None if clean_test_error is None else float(clean_test_error),
        "train_time_s": None if train_time_s is None else float(train_time_s),
        "num_feature_taps": len(stats) // 2,
        "weights_sha256": checkpoint_hash(path),
        "versions": library_versions(),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(header, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint header for {path} is not JSON-serialisable (model_kwargs / extra): {e}") from None
    _atomic_write(header_path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint (does not read or verify the weights)."""
    path = Path(path)
    hpath = header_path(path)
    if not hpath.is_file():
        raise FileNotFoundError(f"source checkpoint header not found: {hpath} (written next to {path.name} by save_checkpoint)")
    try:
        header = json.loads(hpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"source checkpoint header {hpath} is not valid JSON (truncated?): {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"source checkpoint header {hpath}: format is not {FORMAT!r}")
    for key in ("model", "model_kwargs", "num_classes", "in_channels", "weights_sha256"):
        if key not in header:
            raise CheckpointError(f"source checkpoint header {hpath}: missing field {key!r}")
    return header


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Header of a checkpoint whose weights file matches the sha256 the header records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source checkpoint not found: {path}")
    header = read_header(path)
    actual = checkpoint_hash(path)
    if actual != header["weights_sha256"]:
        raise CheckpointError(
            f"source checkpoint {path} does not match its header {header_path(path).name}: sha256 {actual[:12]}... "
            f"!= {header['weights_sha256'][:12]}... (file truncated, edited or overwritten without its header)"
        )
    return header


def _load_payload(path: Path, device: str | torch.device) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for truncated zips / pickles
        raise CheckpointError(f"cannot read source checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a metatta source checkpoint (format {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(state_dict, feature_stats, header) of a verified checkpoint."""
    path = Path(path)
    header = verify_checkpoint(path)
    payload = _load_payload(path, device)
    return payload["state_dict"], dict(payload.get("feature_stats") or {}), header


def load_feature_stats(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The clean feature statistics stored in a checkpoint ("mean.<i>", "std.<i>")."""
    _, stats, _ = load_checkpoint(path, device)
    if not stats:
        raise CheckpointError(f"source checkpoint {path} holds no feature statistics (trained without them?)")
    return stats
