"""Corrupted "-C" benchmarks on disk: build them, and read them.

CIFAR-10-C layout (also CIFAR-100-C and the Fashion-MNIST-C built here):
`<corruption>.npy` uint8 (5*N, H, W, C), severity s in rows [(s-1)*N, s*N),
and `labels.npy` (5*N,) (the clean labels repeated five times; CIFAR-10-C
stores them as uint8, the builder here as int64). Readers memory-map the
files, so a domain's images are read from disk only when a batch needs them.

ImageNet-C layout: `<corruption>/<severity>/<wnid>/<file>.JPEG`, read lazily
(`read_imagenet_c`), optionally restricted to a list of images (the
5,000-image subset most TTA papers use, see `read_subset_list`).

Building (`build_c_benchmark`) is done once and is safe to interrupt or run
twice at the same time:
- each file is written under a temporary name and renamed into place, so a
  killed build never leaves a truncated `<corruption>.npy`, and a finished
  file is never touched again;
- `manifest.json` records what the files are (source, N, seed, corruption
  code version, sha256 of the clean images and labels, library versions) and
  the sha256 of each file; a rebuild skips every file that is present and
  matches it, and refuses a directory that holds a different benchmark, or
  .npy files it did not write (no manifest);
- the content is what counts, never size and mtime (bytes can be replaced
  keeping both): the builder and `read_cifar_c` check each file's sha256
  against the manifest once per process, before any image is read (~1.5 s for
  the 15 full Fashion-MNIST-C files, 560 MB; again only if a file is written
  meanwhile, which changes its ctime);
- an exclusive lock on `.build.lock` serialises builders of one directory
  (several Ray workers may ask for the same benchmark at once).
Image i of corruption c at severity s is corrupted with the seed
`image_seeds(seed, c, s, ...)[i]`, a fixed function of (seed, corruption
index, severity, image index): a subset of the first N images is the same,
image for image, as those rows of the full benchmark.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import metatta
from metatta.data import corruptions as image_corruptions  # the module: tests replace its `corrupt`
from metatta.data import fashion_mnist
from metatta.data.domains import ALL_CORRUPTIONS, SEVERITIES, check_corruption_names, check_severities
from metatta.data.types import DomainData
from metatta.paths import cache_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LABELS = "labels.npy"
LOCK = ".build.lock"
MAX_IMAGES = 1_000_000  # image_seeds keeps (corruption, severity) blocks of this many seeds apart
FASHION_MNIST_TEST_SIZE = 10_000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


# ---- seeds ------------------------------------------------------------------------------------------
def image_seeds(seed: int, corruption: str, severity: int, count: int, start: int = 0) -> np.ndarray:
    """Seeds of images start .. start+count-1 for (seed, corruption, severity), int64.

    seed_i = (seed * 1_000_003 + corruption_index * 10_007 + severity * 101) * 10**6 + i (mod 2**62),
    corruption_index the position in ALL_CORRUPTIONS: distinct for every (corruption, severity,
    image) of one seed, and independent of which other images are built."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_corruption_names([corruption])
    check_severities([severity])
    if start < 0 or count < 0 or start + count > MAX_IMAGES:
        raise ValueError(f"image indices must lie in [0, {MAX_IMAGES}), got {start}..{start + count - 1}")
    corruption_index = ALL_CORRUPTIONS.index(corruption)
    base = (int(seed) * 1_000_003 + corruption_index * 10_007 + int(severity) * 101) * MAX_IMAGES
    return (base + np.arange(start, start + count, dtype=np.int64)) % (2**62)


# ---- small file helpers -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# sha256 of files hashed by this process, keyed by what changes whenever a file's bytes may have:
# inode, size, mtime and ctime (ctime cannot be set back by `touch`, unlike the mtime), so each file
# is hashed once per process and again only if it is written meanwhile.
_HASHED: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _content_sha256(path: Path) -> str:
    """sha256 of the file's bytes, hashed at most once per process while the file is unchanged."""
    key = _stat_key(path)
    if key not in _HASHED:
        _HASHED[key] = _sha256(path)
    return _HASHED[key]


def _temporary(path: Path) -> Path:
    # Unique per writer: two processes never write the same temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on directory/.build.lock for the length of a build (Linux/macOS)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builders are then the user's concern
        yield
        return
    with open(directory / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _library_versions() -> dict[str, str]:
    return {"metatta": metatta.__version__, "torch": torch.__version__, "numpy": np.__version__}


# ---- manifest ---------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict:
    """The manifest of a built benchmark ({} when there is none)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e}); delete the directory to rebuild it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ValueError(f"{path}: not a benchmark manifest (expected an object with a 'files' object)")
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    built = [c for c in ALL_CORRUPTIONS if f"{c}.npy" in manifest["files"]]
    manifest["corruptions"] = built
    manifest["severities"] = list(SEVERITIES)
    _atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _record(directory: Path, manifest: dict, name: str, sha: str | None = None) -> None:
    path = directory / name
    st = path.stat()
    manifest["files"][name] = sha or _content_sha256(path)
    manifest.setdefault("file_info", {})[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                  "versions": _library_versions()}


def _matches_manifest(directory: Path, manifest: dict, name: str) -> bool:
    """Whether directory/name is present and is the file the manifest recorded: its sha256,
    computed once per process (size and mtime prove nothing: bytes can be replaced keeping both)."""
    path = directory / name
    expected = manifest["files"].get(name)
    if expected is None or not path.is_file():
        return False
    if _content_sha256(path) == expected:
        st = path.stat()
        info = manifest.setdefault("file_info", {}).get(name, {})
        manifest["file_info"][name] = {**info, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        return True
    log.warning("%s does not match its sha256 in %s; rebuilding it", path, directory / MANIFEST)
    return False


def verify_against_manifest(directory: Path, names: Sequence[str]) -> None:
    """Before a benchmark built here is read: each file's bytes must be those its manifest recorded
    (sha256, once per process). A directory without a manifest (e.g. a downloaded CIFAR-10-C) has
    nothing to check against."""
    manifest = read_manifest(directory)
    if not manifest:
        return
    for name in names:
        expected = manifest["files"].get(name)
        if expected is None:
            raise ValueError(f"{directory / name}: not listed in {directory / MANIFEST} (not written by the builder, "
                             f"or its build was interrupted); delete it, and the builder rebuilds it")
        if _content_sha256(directory / name) != expected:
            raise ValueError(f"{directory / name}: its bytes differ from the sha256 recorded in {directory / MANIFEST} "
                             f"(replaced or damaged after it was built); delete it, and the builder rebuilds it")


# ---- builder ----------------------------------------------------------------------------------------
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
    device: str | torch.device = "cpu",
) -> Path:
    """Write the -C benchmark of clean `images` (uint8 (N, H, W, C), C in {1, 3}) into `out_dir`.

    One `<corruption>.npy` per corruption (all five severities; the layout has no room for fewer),
    `labels.npy` and `manifest.json`. Files already present and matching the manifest are kept;
    `source` names the clean data in the manifest; `device` is where the corruptions run.
    Returns `out_dir`."""
    corruptions = list(dict.fromkeys(check_corruption_names(corruptions)))
    severities = check_severities(severities)
    if sorted(severities) != list(SEVERITIES):
        raise ValueError(f"severities: the -C layout stores all five severities 1..5; got {severities}")
    _check_clean(images, labels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(images)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if n > MAX_IMAGES:
        raise ValueError(f"images: at most {MAX_IMAGES} images per benchmark, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"source": source, "num_images": n, "seed": int(seed), "shape": list(images.shape[1:]),
                "corruptions_version": image_corruptions.VERSION}
    clean_sha = _clean_sha256(images, labels)
    with _build_lock(out):
        for stale in out.glob(".*.partial"):  # left by a killed builder; we hold the lock, so no one writes them
            stale.unlink()
        manifest = read_manifest(out)
        if not manifest:
            foreign = sorted(p.name for p in out.glob("*.npy"))
            if foreign:  # e.g. a downloaded CIFAR-10-C: never overwrite what we did not write
                raise ValueError(f"{out} holds .npy files without a {MANIFEST} ({', '.join(foreign[:3])}...); "
                                 f"it was not built here. Choose another directory")
        elif manifest.get("identity") != identity:
            raise ValueError(f"{out} holds a different benchmark ({manifest.get('identity')}, not {identity}); "
                             f"choose another directory or delete it")
        elif manifest.get("clean_sha256", clean_sha) != clean_sha:
            raise ValueError(f"{out} holds a different benchmark: it was built from other clean images or labels "
                             f"(clean_sha256 {manifest['clean_sha256'][:12]}..., these give {clean_sha[:12]}...)")
        manifest = {**manifest, "format": "cifar-c", "identity": identity, "clean_sha256": clean_sha,
                    "files": manifest.get("files", {})}
        _write_manifest(out, manifest)  # before any data file: every file here is then ours
        if not _matches_manifest(out, manifest, LABELS):
            _atomic_save(out / LABELS, np.tile(np.asarray(labels, dtype=np.int64), len(SEVERITIES)))
            _record(out, manifest, LABELS)
            _write_manifest(out, manifest)
        todo = [c for c in corruptions if not _matches_manifest(out, manifest, f"{c}.npy")]
        _write_manifest(out, manifest)  # keeps any sizes and times re-verified above
        if todo:
            log.info("building %d corruption file(s) of %d images in %s", len(todo), n, out)
        clean = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        bar = tqdm(total=len(todo) * len(SEVERITIES) * n, unit="img", desc=f"{source}-C",
                   disable=not (progress and todo))
        with bar:
            for corruption in todo:
                bar.set_postfix_str(corruption)
                path = out / f"{corruption}.npy"
                _build_one(path, clean, corruption, seed, batch_size, device, image_corruptions.corrupt, bar)
                _record(out, manifest, path.name)
                _write_manifest(out, manifest)  # after each file: a killed build keeps what it finished
    return out


def _build_one(path: Path, clean: torch.Tensor, corruption: str, seed: int, batch_size: int,
               device, corrupt, bar) -> None:
    """All severities of one corruption into path, through a temporary memory-mapped file."""
    n, channels, height, width = clean.shape
    tmp = _temporary(path)
    try:
        result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(SEVERITIES) * n, height, width, channels))
        for severity in SEVERITIES:
            seeds = image_seeds(seed, corruption, severity, n)
            for start in range(0, n, batch_size):
                x = clean[start:start + batch_size].to(device).float().div_(255)
                y = corrupt(x, corruption, severity, seeds[start:start + len(x)])
                row = (severity - 1) * n + start
                # round, not truncate: the nearest uint8 to the corrupted value
                result[row:row + len(x)] = (y * 255).round_().clamp_(0, 255).to(torch.uint8) \
                    .permute(0, 2, 3, 1).cpu().numpy()
                bar.update(len(x))
        result.flush()
        del result
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clean_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _check_clean(images, labels) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be a uint8 array (N, H, W, C) with C in 1 or 3, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if len(images) == 0:
        raise ValueError("images: no images given")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")


def cache_home() -> Path:
    """Where built benchmarks go: the cache root, $METATTA_CACHE, else ~/.cache/metatta."""
    return cache_root()


def fashion_mnist_c(
    root: str | Path | None = None,
    num_images: int | None = None,
    seed: int = 0,
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    *,
    data_root: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """The Fashion-MNIST-C directory, built from the clean test split on first use.

    root: where to build it; by default `cache_home()/fashion_mnist_c-n<N>-s<seed>-v<corruption
    code version>`, so subsets, seeds and corruption versions never share a directory.
    num_images: the first N test images only (None: all 10,000). data_root: where the clean
    Fashion-MNIST is (see load_fashion_mnist). Only `corruptions` are built; a later call with
    more corruptions adds the missing files."""
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)
                                   or not 1 <= num_images <= FASHION_MNIST_TEST_SIZE):
        raise ValueError(f"num_images must be an integer in [1, {FASHION_MNIST_TEST_SIZE}] or None, got {num_images!r}")
    images, labels = fashion_mnist.load_fashion_mnist("test", data_root)
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    out = Path(root) if root is not None else \
        cache_home() / f"fashion_mnist_c-n{len(images)}-s{seed}-v{image_corruptions.VERSION}"
    return build_c_benchmark(images, labels, out, corruptions, seed=seed, source="fashion_mnist/test",
                             progress=progress, device=device)


# ---- CIFAR-10-C style reader ------------------------------------------------------------------------
def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # what numpy raises for a bad header or a short file
        raise ValueError(f"{path}: unreadable or truncated .npy file ({e})") from None


def images_per_severity(root: str | Path) -> int:
    """N, the images of each (corruption, severity) block of a CIFAR-10-C style directory (from labels.npy)."""
    labels = _load_npy(Path(root) / LABELS)
    return len(labels) // len(SEVERITIES)


def capped_num_images(root: str | Path, num_images: int | None, first_image: int = 0,
                      field: str = "num_images") -> int | None:
    """`num_images`, or the images each (corruption, severity) block holds from `first_image` on when
    that is fewer (a small dataset, e.g. a digits-sized one), with a warning naming `field`."""
    if num_images is None:
        return None
    available = images_per_severity(root) - first_image
    if 1 <= available < num_images:
        log.warning("%s: %d asked, but %s holds %d images per corruption and severity from image %d on; "
                    "using %d", field, num_images, root, available, first_image, available)
        return available
    return num_images


def read_cifar_c(
    root: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    num_images: int | None = None,
    first_image: int = 0,
) -> list[DomainData]:
    """Domains (for each corruption, for each severity, in the order given) of a CIFAR-10-C style directory.

    Images are read-only memory maps (uint8 (N, H, W, C)); labels are int64 in memory.
    num_images: N images of each severity block (None: all from first_image on), starting at
    first_image (to keep clear of images an adapter was trained or validated on)."""
    root = Path(root)
    corruptions = check_corruption_names(corruptions)
    severities = check_severities(severities)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark directory not found: {root}")
    labels_path = root / LABELS
    labels = _load_npy(labels_path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path}: expected a 1-D integer array of 5*N labels, got {labels.dtype} {labels.shape}")
    if len(labels) == 0 or len(labels) % len(SEVERITIES):
        raise ValueError(f"{labels_path}: {len(labels)} labels is not a positive multiple of 5 (5 severities x N)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(f"{labels_path}: negative labels")
    n = len(labels) // len(SEVERITIES)
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer))
                                   or not 1 <= num_images <= n):
        raise ValueError(f"num_images must be an integer in [1, {n}] for {root}, got {num_images!r}")
    if isinstance(first_image, bool) or not isinstance(first_image, (int, np.integer)) or not 0 <= first_image < n:
        raise ValueError(f"first_image must be an integer in [0, {n}) for {root}, got {first_image!r}")
    take = n - first_image if num_images is None else int(num_images)
    if first_image + take > n:
        raise ValueError(f"first_image {first_image} + num_images {take} exceeds the {n} images per severity of {root}")
    domains, arrays = [], {}
    for corruption in corruptions:
        path = root / f"{corruption}.npy"
        data = _load_npy(path)
        if data.dtype != np.uint8:
            raise ValueError(f"{path}: expected dtype uint8, got {data.dtype}")
        if data.ndim != 4 or data.shape[-1] not in (1, 3):
            raise ValueError(f"{path}: expected shape (5*N, H, W, C) with C in 1 or 3, got {data.shape}")
        if len(data) % len(SEVERITIES):
            raise ValueError(f"{path}: {len(data)} rows is not a multiple of 5 (5 severities x N)")
        if len(data) != len(labels):
            raise ValueError(f"{path}: {len(data)} images but {labels_path} has {len(labels)} labels")
        arrays[corruption] = data
    # The checks above read headers only (memory maps); the content is checked before any image is read.
    verify_against_manifest(root, [LABELS, *(f"{c}.npy" for c in arrays)])
    for corruption, data in arrays.items():
        for s in severities:
            rows = slice((s - 1) * n + first_image, (s - 1) * n + first_image + take)
            domains.append(DomainData(corruption, s, data[rows], labels[rows].copy()))
    return domains


# ---- ImageNet-C reader ------------------------------------------------------------------------------
class ImageFileArray:
    """A lazy, read-only uint8 (N, S, S, 3) array of image files, decoded when indexed.

    Stands in for a numpy array in `DomainData.images` (streams index it with sorted row
    arrays), so an ImageNet-C domain never sits in memory whole. Each image is converted to
    RGB; one that is not S x S is resized (shorter side to S * 256 / 224, bilinear) and
    center-cropped to S, the usual ImageNet evaluation transform. ImageNet-C files are already
    224 x 224, so with S = 224 they are used as stored."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str | Path], image_size: int = 224):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.paths = [Path(p) for p in paths]
        self.image_size = image_size
        self.shape = (len(self.paths), image_size, image_size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._decode(self.paths[index])
        rows = np.arange(len(self.paths))[index]  # slices, integer and boolean arrays, like numpy
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        for i, row in enumerate(rows):
            out[i] = self._decode(self.paths[row])
        return out

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        size = self.image_size
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from None
        if img.size != (size, size):
            short = round(size * 256 / 224)
            w, h = img.size
            scale = short / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def read_subset_list(path: str | Path, classes: Sequence[str]) -> list[str]:
    """Relative image paths (`<wnid>/<file>`) of an ImageNet(-C) subset list file.

    Accepted lines (blank lines and `#` comments are skipped):
    - `n01440764/ILSVRC2012_val_00000293.JPEG`, the format of RobustBench's
      `imagenet_test_image_ids.txt` (the 5,000-image subset used by Tent, CoTTA, EATA,
      SAR and most TTA papers); the class is the wnid folder.
    - `n01440764/ILSVRC2012_val_00000293.JPEG 0`, path and class index (the
      "path label" list files of other TTA codebases); the index must equal the wnid's
      position in `classes`, else the list uses another class order and is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet-C subset list not found: {path}")
    index = {wnid: i for i, wnid in enumerate(classes)}
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ValueError(f"{path}:{number}: expected '<wnid>/<file> [label]', got {line!r}")
        relative = parts[0].replace("\\", "/").removeprefix("./")
        wnid = relative.split("/")[0]
        if "/" not in relative or wnid not in index:
            raise ValueError(f"{path}:{number}: {relative!r} does not start with a class folder (wnid) of the "
                             f"benchmark")
        if len(parts) == 2:
            if not parts[1].lstrip("-").isdigit() or int(parts[1]) != index[wnid]:
                raise ValueError(f"{path}:{number}: label {parts[1]} for {wnid}, but {wnid} is class {index[wnid]} "
                                 f"in sorted-wnid order; the list uses another class order")
        out.append(relative)
    if not out:
        raise ValueError(f"{path}: the subset list is empty")
    return out


def read_imagenet_c(
    root: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    subset_list: str | Path | None = None,
    image_size: int = 224,
) -> list[DomainData]:
    """ImageNet-C domains (for each corruption, for each severity), images decoded lazily.

    `root/<corruption>/<severity>/<wnid>/<file>` (also accepts Hendrycks' grouping
    `root/<group>/<corruption>/...`, e.g. `noise/gaussian_noise`). Class indices are the wnids'
    positions in sorted order (ImageNet's standard order); every domain must hold the same
    class folders. `subset_list`: see `read_subset_list`; without it, every image is used.
    Each DomainData's `images` is an `ImageFileArray` (uint8 (N, S, S, 3) on demand)."""
    root = Path(root)
    corruptions = check_corruption_names(corruptions)
    severities = check_severities(severities)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C directory not found: {root}")
    classes: list[str] | None = None
    subset: list[str] | None = None
    domains = []
    for corruption in corruptions:
        base = _imagenet_c_corruption_dir(root, corruption)
        for s in severities:
            folder = base / str(s)
            if not folder.is_dir():
                raise FileNotFoundError(f"ImageNet-C folder not found: {folder}")
            found = sorted(d.name for d in folder.iterdir() if d.is_dir())
            if classes is None:
                classes = found
                if not classes:
                    raise ValueError(f"{folder}: no class folders (<wnid>/) in it")
                if len(classes) != 1000:
                    log.warning("%s has %d class folders, not ImageNet's 1000: class indices are positions "
                                "among these", folder, len(classes))
                if subset_list is not None:
                    subset = read_subset_list(subset_list, classes)
            elif found != classes:
                raise ValueError(f"{folder}: class folders differ from those of the first domain "
                                 f"({len(found)} vs {len(classes)})")
            index = {wnid: i for i, wnid in enumerate(classes)}
            if subset is not None:
                paths = [folder / rel for rel in subset]
                missing = [p for p in paths if not p.is_file()]
                if missing:
                    raise FileNotFoundError(f"{len(missing)} image(s) of {subset_list} missing in {folder}, "
                                            f"e.g. {missing[0]}")
                labels = [index[rel.split("/")[0]] for rel in subset]
            else:
                paths, labels = [], []
                for wnid in classes:
                    files = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                    paths += files
                    labels += [index[wnid]] * len(files)
                if not paths:
                    raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
            domains.append(DomainData(corruption, s, ImageFileArray(paths, image_size),
                                      np.asarray(labels, dtype=np.int64)))
    return domains


def _imagenet_c_corruption_dir(root: Path, corruption: str) -> Path:
    if (root / corruption).is_dir():
        return root / corruption
    grouped = [d / corruption for d in root.iterdir() if (d / corruption).is_dir()]
    if len(grouped) == 1:
        return grouped[0]
    raise FileNotFoundError(f"ImageNet-C folder not found: {root / corruption}")
