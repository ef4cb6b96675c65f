"""Clean Fashion-MNIST, from local files first.

Search order: an explicit `root`; `$METATTA_DATA` (IDX .gz files in it, in a
`fashion-mnist/` subfolder, or torchvision's `FashionMNIST/raw/` layout); the
Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
else a torchvision download into `$METATTA_DATA` or ~/.cache/metatta/data.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def data_home() -> Path:
    return Path(os.environ.get("METATTA_DATA") or Path.home() / ".cache" / "metatta" / "data")


def candidate_dirs(root: str | Path | None = None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    dirs = []
    if os.environ.get("METATTA_DATA"):
        base = Path(os.environ["METATTA_DATA"])
        dirs += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_DIR)
    home = data_home()
    dirs += [home / "FashionMNIST" / "raw"]
    return dirs


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) with a clear error for bad files."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 8:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number {found}, expected {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: truncated or padded IDX file: {len(data) - offset} bytes of data for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "test", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 28, 28, 1), int64 labels (N,)) of a Fashion-MNIST split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = FILES[split]
    for directory in candidate_dirs(root):
        images_path, labels_path = directory / image_name, directory / label_name
        if images_path.is_file() and labels_path.is_file():
            return _parse(images_path, labels_path)
    if root is not None:
        raise FileNotFoundError(f"Fashion-MNIST {split} files ({image_name}, {label_name}) not found in {root}")
    _download()
    directory = data_home() / "FashionMNIST" / "raw"
    return _parse(directory / image_name, directory / label_name)


def _parse(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    log.debug("loaded %d Fashion-MNIST images from %s", len(images), images_path.parent)
    return images[..., None].copy(), labels  # a writable copy: torch warns on read-only buffers


def _download() -> None:
    from torchvision.datasets import FashionMNIST

    home = data_home()
    log.info("Fashion-MNIST not found locally; downloading with torchvision into %s", home)
    try:
        FashionMNIST(str(home), train=True, download=True)
        FashionMNIST(str(home), train=False, download=True)
    except Exception as e:  # any network/HTTP failure: say what the user can do instead
        raise FileNotFoundError(
            "Fashion-MNIST is not available: set $METATTA_DATA to a folder with the IDX .gz files, or install the "
            f"Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or allow the torchvision "
            f"download into {home} (it failed: {e})"
        ) from e
