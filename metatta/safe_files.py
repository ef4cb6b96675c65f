"""Reading files that come from elsewhere (registered adapters, weights, settings) so that a
damaged or hostile file is refused with a ValueError naming it (one line at the launchers,
`metatta.cli`), never a library traceback, and never unpickles objects."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path, what: str = "weights", map_location: Any = "cpu") -> dict[str, Any]:
    """A state dict from a torch file, with `torch.load(weights_only=True)`: a truncated file, a
    foreign format or a pickle of objects (a malicious file) is a ValueError naming `what` and the path."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types (zip, pickle, EOF) for bad files
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} {path}: not a readable weights file ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path}: expected a state dict, got {type(state).__name__}")
    return state


def read_json_file(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e})") from None


def read_yaml_file(path: str | Path, what: str = "file") -> Any:
    """yaml.safe_load: tags that build Python objects (`!!python/object`) are refused, naming the file."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not a plain YAML file ({' '.join(str(e).split())})") from None
