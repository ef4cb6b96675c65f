"""Fashion-MNIST loading: search order, layouts, the IDX parser's errors, caching, download fallback."""
import gzip
import time

import numpy as np
import pytest

from metatta.data import fashion_mnist as fm
from metatta.data.clean import CLEAN_DATASETS, imagenet_folder, load_clean


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(directory, split="test", n=5, gz=True, seed=0, shape=(28, 28)):
    """Write a small IDX pair; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    for name, array, magic in zip(fm.FILES[split], (images, labels), (fm.IMAGE_MAGIC, fm.LABEL_MAGIC)):
        data = idx_bytes(array, magic)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $METATTA_DATA, an empty 'Debian' folder and no real download."""
    monkeypatch.delenv("METATTA_DATA", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_download(home):
        raise FileNotFoundError(f"no download in tests ({home})")

    monkeypatch.setattr(fm, "_download", no_download)
    return tmp_path


# ---- the real data (Debian package on this machine) -------------------------------------------------
@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_files(monkeypatch):
    monkeypatch.delenv("METATTA_DATA", raising=False)
    start = time.perf_counter()
    train_x, train_y = fm.load_fashion_mnist("train")
    assert time.perf_counter() - start < 5  # np.frombuffer: parsing 60k images is fast
    test_x, test_y = fm.load_fashion_mnist("test")
    assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
    assert train_x.dtype == test_x.dtype == np.uint8
    assert train_y.dtype == test_y.dtype == np.int64 and test_y.shape == (10000,)
    assert np.bincount(test_y).tolist() == [1000] * 10  # the real test split is balanced
    assert 50 < test_x.mean() < 100  # real images, not noise
    x, y = load_clean("fashion_mnist", "test")
    assert np.array_equal(x, test_x) and np.array_equal(y, test_y)


# ---- search order and layouts -----------------------------------------------------------------------
@pytest.mark.parametrize("layout, gz", [("", True), ("fashion-mnist", True), ("FashionMNIST/raw", False),
                                        ("FashionMNIST/raw", True)])
def test_explicit_root_layouts(isolated, layout, gz):
    root = isolated / "data"
    images, labels = write_split(root / layout, "train", n=4, gz=gz)
    x, y = fm.load_fashion_mnist("train", root=root)
    assert x.shape == (4, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x[..., 0], images) and np.array_equal(y, labels)


def test_env_var_before_debian_and_debian_before_download(isolated, monkeypatch):
    write_split(isolated / "debian", n=7, seed=1)
    x, _ = fm.load_fashion_mnist("test")
    assert len(x) == 7  # Debian folder used when $METATTA_DATA is unset
    monkeypatch.setenv("METATTA_DATA", str(isolated / "env"))
    (isolated / "env").mkdir()
    assert len(fm.load_fashion_mnist("test")[0]) == 7  # $METATTA_DATA without the files: falls through
    write_split(isolated / "env" / "fashion-mnist", n=3, seed=2)
    assert len(fm.load_fashion_mnist("test")[0]) == 3  # $METATTA_DATA wins over Debian
    assert fm.candidate_dirs()[:3] == [isolated / "env", isolated / "env" / "fashion-mnist",
                                       isolated / "env" / "FashionMNIST" / "raw"]


def test_explicit_root_is_the_only_place_searched(isolated):
    write_split(isolated / "debian", n=7)
    with pytest.raises(FileNotFoundError, match="not found in .*elsewhere"):
        fm.load_fashion_mnist("test", root=isolated / "elsewhere")


def test_incomplete_pair_is_an_error_not_a_fallthrough(isolated):
    write_split(isolated / "debian", n=7)
    root = isolated / "data"
    write_split(root, "test")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        fm.load_fashion_mnist("test", root=root)


def test_split_name_checked(isolated):
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("val")


# ---- download fallback ------------------------------------------------------------------------------
def test_failed_download_says_the_three_options(tmp_path, monkeypatch):
    monkeypatch.setenv("METATTA_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", Offline)
    with pytest.raises(FileNotFoundError) as info:
        fm.load_fashion_mnist("test")
    message = str(info.value)
    assert "$METATTA_DATA" in message and "dataset-fashion-mnist" in message and "torchvision" in message
    assert "network unreachable" in message


def test_download_lands_in_metatta_data(tmp_path, monkeypatch):
    monkeypatch.setenv("METATTA_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    calls = []

    class FakeDownload:  # writes what torchvision would: <root>/FashionMNIST/raw/*.gz
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_split(tmp_path / "data" / "FashionMNIST" / "raw", "train" if train else "test", n=2 if train else 3)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeDownload)
    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (3, 28, 28, 1) and calls and all(c[2] for c in calls)
    assert calls[0][0] == str(tmp_path / "data")


# ---- the IDX parser ---------------------------------------------------------------------------------
def test_idx_parser_errors_name_the_file(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    good = idx_bytes(images, fm.IMAGE_MAGIC)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(good))
    assert np.array_equal(fm.read_idx(path, fm.IMAGE_MAGIC), images)
    cases = {
        "truncated IDX file": gzip.compress(good[:-1]),
        "oversized": gzip.compress(good + b"\0"),
        "magic": gzip.compress(idx_bytes(images, fm.LABEL_MAGIC)),
        "truncated IDX header": gzip.compress(good[:9]),
        "not even a header": gzip.compress(good[:2]),
        "damaged or truncated": gzip.compress(good)[:-20],  # gzip stream cut short
        "damaged or truncated ": b"not gzip at all",
    }
    for match, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=match.strip()) as info:
            fm.read_idx(path, fm.IMAGE_MAGIC)
        assert str(path) in str(info.value)
    plain = tmp_path / "y-idx3-ubyte"
    plain.write_bytes(good[:-5])
    with pytest.raises(ValueError, match="y-idx3-ubyte.*truncated"):
        fm.read_idx(plain, fm.IMAGE_MAGIC)


def test_label_count_and_image_size_checked(isolated):
    root = isolated / "data"
    write_split(root, "test", n=4)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(3, np.uint8), fm.LABEL_MAGIC)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*3.*4 images"):
        fm.load_fashion_mnist("test", root=root)
    write_split(root, "train", n=2, shape=(32, 32))
    with pytest.raises(ValueError, match="train-images.*28, 28"):
        fm.load_fashion_mnist("train", root=root)


def test_labels_above_nine_rejected(isolated):
    root = isolated / "data"
    write_split(root, "test", n=2)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.array([1, 12], np.uint8), fm.LABEL_MAGIC)))
    with pytest.raises(ValueError, match="0..9"):
        fm.load_fashion_mnist("test", root=root)


# ---- caching ----------------------------------------------------------------------------------------
def test_cache_parses_once_returns_copies_and_notices_replaced_files(isolated, monkeypatch):
    root = isolated / "data"
    write_split(root, "test", n=4, seed=3)
    calls = []
    real = fm.read_idx
    monkeypatch.setattr(fm, "read_idx", lambda path, magic: calls.append(path) or real(path, magic))
    x1, y1 = fm.load_fashion_mnist("test", root=root)
    x1[:] = 0  # the caller's copy; must not reach the cache
    x2, y2 = fm.load_fashion_mnist("test", root=root)
    assert len(calls) == 2  # images + labels, parsed once
    assert x2.any() and x2.flags.writeable and y2.flags.writeable
    time.sleep(0.01)
    new_images, _ = write_split(root, "test", n=6, seed=4)  # replaced: new size and mtime
    x3, _ = fm.load_fashion_mnist("test", root=root)
    assert len(calls) == 4 and np.array_equal(x3[..., 0], new_images)


# ---- other clean datasets ---------------------------------------------------------------------------
def test_load_clean_errors(tmp_path, monkeypatch):
    assert CLEAN_DATASETS == ("fashion_mnist", "cifar10", "cifar100", "digits")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_clean("mnist", "test")
    with pytest.raises(ValueError, match="split"):
        load_clean("cifar10", "val")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*root="):
        load_clean("cifar10", "test", root=tmp_path)
    monkeypatch.setenv("METATTA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_clean("cifar100", "train")
    (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty: torchvision's checksum fails
    with pytest.raises(ValueError, match="incomplete or corrupted"):
        load_clean("cifar10", "test", root=tmp_path / "cifar-10-batches-py")


def test_load_clean_cifar_converts_torchvision_data(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    seen = {}

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            seen.update(root=root, train=train, download=download)
            self.data = np.full((3, 32, 32, 3), 7, dtype=np.uint8)
            self.targets = [1, 2, 3]

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    x, y = load_clean("cifar10", "train", root=tmp_path / "cifar-10-batches-py")  # the folder itself is fine too
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64 and y.tolist() == [1, 2, 3]
    assert seen == {"root": str(tmp_path), "train": True, "download": False}


def test_imagenet_folder(tmp_path):
    from PIL import Image

    for wnid in ("n02", "n01"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / wnid / "a.JPEG")
    dataset = imagenet_folder(tmp_path)
    assert dataset.classes == ["n01", "n02"] and len(dataset) == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        imagenet_folder(tmp_path / "nowhere")


def test_digits_is_a_small_clean_dataset_that_is_never_flipped():
    """Issue #24.9's digits-sized dataset: scikit-learn's bundled digits as 28x28 uint8, 1,400 + 397."""
    pytest.importorskip("sklearn")
    from metatta.data.clean import flips_allowed

    train_x, train_y = load_clean("digits", "train")
    test_x, test_y = load_clean("digits", "test")
    assert train_x.shape == (1400, 28, 28, 1) and test_x.shape == (397, 28, 28, 1)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64 and sorted(set(train_y)) == list(range(10))
    assert train_x.max() == 255 and len(test_y) == 397
    assert not flips_allowed("digits") and flips_allowed("fashion_mnist") and flips_allowed("cifar10")
