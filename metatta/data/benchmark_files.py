"""Corrupted "-C" benchmarks on disk: build them, and read them.

CIFAR-10-C layout (also CIFAR-100-C and the Fashion-MNIST-C built here):
`<corruption>.npy` uint8 (5*N, H, W, C), severity s in rows [(s-1)*N, s*N),
and `labels.npy` (5*N,). ImageNet-C layout:
`<corruption>/<severity>/<wnid>/<file>.JPEG`.

Building writes each file atomically (temporary name, then rename), so an
interrupted build never leaves a truncated file and never touches files already
written; a rebuild skips corruptions whose file exists and matches the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from metatta.data.domains import ALL_CORRUPTIONS, SEVERITIES, check_corruption_names, check_severities
from metatta.data.types import DomainData

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LABELS = "labels.npy"


def image_seeds(seed: int, corruption: str, severity: int, count: int) -> np.ndarray:
    """Per-image seeds, a fixed function of (seed, corruption, severity, image index),
    so any subset of a benchmark can be regenerated identically."""
    corruption_index = ALL_CORRUPTIONS.index(corruption)
    base = (seed * 1_000_003 + corruption_index * 10_007 + severity * 101) * 1_000_000
    return (base + np.arange(count, dtype=np.int64)) % (2**62)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def build_c_benchmark(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    batch_size: int = 1000,
    source: str = "unknown",
    progress: bool = True,
) -> Path:
    """Corrupt `images` (uint8 N, H, W, C) with every corruption and severity into `out_dir`."""
    corruptions = check_corruption_names(corruptions)
    severities = check_severities(severities)
    if list(severities) != list(SEVERITIES):
        raise ValueError(f"the -C layout stores all five severities; got {severities}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C in 1 or 3, got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(images)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    from metatta.data.corruptions import VERSION as corruptions_version

    identity = {"source": source, "num_images": n, "seed": seed, "shape": list(images.shape[1:]),
                "corruptions_version": corruptions_version}
    if manifest and manifest.get("identity") != identity:
        raise ValueError(f"{out} holds a different benchmark ({manifest.get('identity')}); "
                         f"choose another directory or delete it")
    manifest = {"identity": identity, "files": manifest.get("files", {})}
    labels_path = out / LABELS
    if not labels_path.is_file():
        _atomic_save(labels_path, np.tile(np.asarray(labels, dtype=np.int64), len(SEVERITIES)))
        manifest["files"][LABELS] = _sha256(labels_path)
    from metatta.data.corruptions import corrupt

    clean = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    todo = [c for c in corruptions if not ((out / f"{c}.npy").is_file() and f"{c}.npy" in manifest["files"])]
    for corruption in tqdm(todo, desc="building -C benchmark", disable=not (progress and todo)):
        result = np.empty((len(SEVERITIES) * n, *images.shape[1:]), dtype=np.uint8)
        for severity in SEVERITIES:
            seeds = image_seeds(seed, corruption, severity, n)
            for start in range(0, n, batch_size):
                x = clean[start:start + batch_size].float().div(255)
                y = corrupt(x, corruption, severity, seeds[start:start + batch_size].tolist())
                rows = slice((severity - 1) * n + start, (severity - 1) * n + start + len(x))
                result[rows] = (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        path = out / f"{corruption}.npy"
        _atomic_save(path, result)
        manifest["files"][path.name] = _sha256(path)
        manifest_path.write_text(json.dumps(manifest, indent=1))  # after each file: progress survives a kill
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return out


def cache_home() -> Path:
    return Path(os.environ.get("METATTA_CACHE") or Path.home() / ".cache" / "metatta")


def fashion_mnist_c(root: str | Path | None = None, num_images: int | None = None, seed: int = 0,
                    corruptions: Sequence[str] = ALL_CORRUPTIONS) -> Path:
    """Fashion-MNIST-C (from the clean test split), built once into the cache."""
    from metatta.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    from metatta.data.corruptions import VERSION

    # The corruption version is part of the name: an upgrade builds anew beside the old files.
    out = Path(root) if root else cache_home() / f"fashion_mnist_c-n{len(images)}-s{seed}-v{VERSION}"
    return build_c_benchmark(images, labels, out, corruptions, seed=seed, source="fashion_mnist/test")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable or truncated .npy file ({e})") from None


def read_cifar_c(
    root: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    num_images: int | None = None,
) -> list[DomainData]:
    """Domains (corruption x severity, in that order) of a CIFAR-10-C style directory.

    `num_images` takes the first N images of each severity block (None: all)."""
    root = Path(root)
    corruptions = check_corruption_names(corruptions)
    severities = check_severities(severities)
    labels = _load_npy(root / LABELS)
    if labels.ndim != 1 or len(labels) % len(SEVERITIES):
        raise ValueError(f"{root / LABELS}: expected a 1-D array of 5*N labels, got shape {labels.shape}")
    n = len(labels) // len(SEVERITIES)
    if num_images is not None and not 1 <= num_images <= n:
        raise ValueError(f"num_images must be in [1, {n}] for {root}, got {num_images}")
    take = n if num_images is None else num_images
    domains = []
    for corruption in corruptions:
        path = root / f"{corruption}.npy"
        data = _load_npy(path)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] not in (1, 3):
            raise ValueError(f"{path}: expected uint8 (5*N, H, W, C), got {data.dtype} {data.shape}")
        if len(data) != len(labels):
            raise ValueError(f"{path}: {len(data)} images but {root / LABELS} has {len(labels)} labels")
        for s in severities:
            rows = slice((s - 1) * n, (s - 1) * n + take)
            domains.append(DomainData(corruption, s, data[rows], np.asarray(labels[rows], dtype=np.int64)))
    return domains


def read_imagenet_c(
    root: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    subset_list: str | Path | None = None,
):
    """ImageNet-C domains as lazy torchvision datasets, one per (corruption, severity).

    `subset_list`: a text file of relative image paths (`<wnid>/<file>.JPEG`,
    one per line, an optional label after a space is ignored), the 5,000-image
    subset most TTA papers use; images not listed are skipped."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    corruptions = check_corruption_names(corruptions)
    severities = check_severities(severities)
    keep = None
    if subset_list is not None:
        subset_list = Path(subset_list)
        if not subset_list.is_file():
            raise FileNotFoundError(f"ImageNet-C subset list not found: {subset_list}")
        keep = {line.split()[0] for line in subset_list.read_text().splitlines() if line.strip()}
    out = []
    for corruption in corruptions:
        for s in severities:
            folder = root / corruption / str(s)
            if not folder.is_dir():
                raise FileNotFoundError(f"ImageNet-C folder not found: {folder}")
            dataset = ImageFolder(str(folder))
            if keep is not None:
                dataset.samples = [(p, y) for p, y in dataset.samples
                                   if str(Path(p).relative_to(folder)) in keep]
                dataset.imgs = dataset.samples
                dataset.targets = [y for _, y in dataset.samples]
            out.append((f"{corruption}-{s}", dataset))
    return out
