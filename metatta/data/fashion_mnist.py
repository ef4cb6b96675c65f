"""Clean Fashion-MNIST, from local files first.

Where the files are looked for, in order:
1. an explicit `root` (only there);
2. `$METATTA_DATA`: the IDX files directly in it, in a `fashion-mnist/`
   subfolder, or in torchvision's `FashionMNIST/raw/` layout;
3. the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
4. a torchvision download into `$METATTA_DATA`, else <cache root>/data (`metatta.paths`).

Each split is a pair of IDX files (`train-images-idx3-ubyte`,
`train-labels-idx1-ubyte`, `t10k-...` for test), gzipped (`.gz`) or not.
The IDX parser is our own (a few lines, and it can say exactly what is wrong
with a damaged file); parsed arrays are cached in memory per file version.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path

import numpy as np

from metatta.paths import data_root

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # unsigned bytes, 3 resp. 1 dimensions
IMAGE_SHAPE = (28, 28)


def data_home() -> Path:
    """Where a download goes: $METATTA_DATA, else <cache root>/data ($METATTA_CACHE, else ~/.cache/metatta)."""
    return data_root()


def _layouts(base: Path) -> list[Path]:
    return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def candidate_dirs(root: str | Path | None = None) -> list[Path]:
    """The folders searched, in order (see the module docstring)."""
    if root is not None:
        return _layouts(Path(root))
    dirs = _layouts(Path(os.environ["METATTA_DATA"])) if os.environ.get("METATTA_DATA") else []
    dirs += [DEBIAN_DIR, data_home() / "FashionMNIST" / "raw"]
    return list(dict.fromkeys(dirs))  # drop repeats, keep the order


def find_split(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of `split` in `directory`, `.gz` preferred; None if neither is there.

    A folder holding one file of the pair but not the other is a broken copy, not an absent
    one: that raises rather than silently falling through to another source."""
    found = []
    for name in FILES[split]:
        path = next((p for p in (directory / f"{name}.gz", directory / name) if p.is_file()), None)
        found.append(path)
    if all(p is None for p in found):
        return None
    if any(p is None for p in found):
        missing = [name for name, p in zip(FILES[split], found) if p is None]
        raise FileNotFoundError(f"Fashion-MNIST {split} split in {directory} is incomplete: "
                                f"{missing[0]}(.gz) is missing")
    return found[0], found[1]


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (optionally gzipped); errors name the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip: BadGzipFile (an OSError), or EOFError when cut short
        raise ValueError(f"{path}: cannot read IDX file, damaged or truncated ({e})") from None
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, not even a header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number {found:#010x}, expected {magic:#010x} "
                         f"(not an IDX {'image' if magic == IMAGE_MAGIC else 'label'} file?)")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        kind = "truncated" if len(data) - offset < expected else "oversized"
        raise ValueError(f"{path}: {kind} IDX file: {len(data) - offset} bytes of data for shape {dims} "
                         f"({expected} expected)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28, 1), labels int64 (N,)) of a Fashion-MNIST split ("train" or "test").

    Returns fresh arrays the caller may modify; the parsed files stay cached in memory."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for directory in candidate_dirs(root):
        pair = find_split(directory, split)
        if pair is not None:
            images, labels = _parse_cached(*pair, _stamp(pair[0]), _stamp(pair[1]))
            return images.copy(), labels.copy()
    if root is not None:
        raise FileNotFoundError(f"Fashion-MNIST {split} files ({FILES[split][0]}.gz, {FILES[split][1]}.gz) "
                                f"not found in {root} (nor in its fashion-mnist/ or FashionMNIST/raw/ subfolder)")
    _download(data_home())
    pair = find_split(data_home() / "FashionMNIST" / "raw", split)
    if pair is None:
        raise FileNotFoundError(f"torchvision reported a successful download, but the {split} files are not in "
                                f"{data_home() / 'FashionMNIST' / 'raw'}")
    images, labels = _parse_cached(*pair, _stamp(pair[0]), _stamp(pair[1]))
    return images.copy(), labels.copy()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _parse_cached(images_path: Path, labels_path: Path, images_stamp, labels_stamp) -> tuple[np.ndarray, np.ndarray]:
    # Keyed by path and (size, mtime): a replaced file is parsed anew. The arrays are made
    # read-only so that no caller can change the cached copy (callers get copies).
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must lie in 0..9, found {int(labels.max())}")
    log.debug("parsed %d Fashion-MNIST images from %s", len(images), images_path)
    images = images[..., None]
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _download(home: Path) -> None:
    """torchvision download into `home`/FashionMNIST/raw; on failure, say what the user can do."""
    log.info("Fashion-MNIST not found locally; downloading it with torchvision into %s", home)
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(home), train=train, download=True)
    except Exception as e:  # network, HTTP, checksum: all end in the same advice
        raise FileNotFoundError(
            "Fashion-MNIST is not available. Do one of: (1) set $METATTA_DATA to a folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz (directly, in fashion-mnist/, or in FashionMNIST/raw/); "
            "(2) install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
            f"which puts them in {DEBIAN_DIR}; (3) allow the torchvision download into {home} "
            f"(it failed: {type(e).__name__}: {e})"
        ) from e
