"""The one cache root: `$METATTA_CACHE`, else ~/.cache/metatta.

Everything metatta builds or downloads once and reuses lives under it:

- `data/`: the clean datasets (`$METATTA_DATA` moves just these);
- `fashion_mnist_c-.../`: built benchmark files;
- `models/`: source checkpoints trained by `launch/train_source.py` (when the
  config's `output` is null);
- `eval_claims/`: evaluation-worker claims when the tracking store is not a local SQLite file.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$METATTA_CACHE, else ~/.cache/metatta (not created here)."""
    return Path(os.environ.get("METATTA_CACHE") or Path.home() / ".cache" / "metatta").expanduser()


def data_root() -> Path:
    """Where clean datasets are looked for and downloaded: $METATTA_DATA, else <cache root>/data."""
    return Path(os.environ.get("METATTA_DATA") or cache_root() / "data").expanduser()


def models_dir() -> Path:
    """Default home of trained source checkpoints: <cache root>/models."""
    return cache_root() / "models"
