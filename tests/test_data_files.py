import gzip
import json

import numpy as np
import pytest

from metatta.data import benchmark_files as bf
from metatta.data.fashion_mnist import load_fashion_mnist, read_idx


def fake_corrupt(x, corruption, severity, seeds):
    return (x * (1 - 0.1 * severity)).clamp(0, 1)


@pytest.fixture
def small_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 6).astype(np.int64)


def test_build_and_read_round_trip(tmp_path, small_images, monkeypatch):
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    images, labels = small_images
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog", "snow"], progress=False)
    fog = np.load(out / "fog.npy")
    assert fog.shape == (30, 8, 8, 1) and fog.dtype == np.uint8
    assert np.array_equal(np.load(out / "labels.npy"), np.tile(labels, 5))
    domains = bf.read_cifar_c(out, ["snow", "fog"], [1, 5], num_images=4)
    assert [d.name for d in domains] == ["snow-1", "snow-5", "fog-1", "fog-5"]
    assert np.array_equal(domains[3].images, fog[24:28]) and np.array_equal(domains[3].labels, labels[:4])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"labels.npy", "fog.npy", "snow.npy"}


def test_rebuild_skips_existing_and_never_rewrites(tmp_path, small_images, monkeypatch):
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    images, labels = small_images
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog"], progress=False)
    mtime = (out / "fog.npy").stat().st_mtime_ns

    def broken(*a, **k):
        raise RuntimeError("corruption failed midway")

    monkeypatch.setattr("metatta.data.corruptions.corrupt", broken)
    bf.build_c_benchmark(images, labels, out, ["fog"], progress=False)  # nothing to do
    with pytest.raises(RuntimeError, match="midway"):
        bf.build_c_benchmark(images, labels, out, ["fog", "snow"], progress=False)
    assert (out / "fog.npy").stat().st_mtime_ns == mtime  # what was written is kept
    assert not (out / "snow.npy").exists()  # no truncated file left behind
    with pytest.raises(ValueError, match="different benchmark"):
        bf.build_c_benchmark(images[:3], labels[:3], out, ["fog"], progress=False)


def test_reader_errors_name_the_file(tmp_path, small_images, monkeypatch):
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    images, labels = small_images
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog", "snow"], progress=False)
    with pytest.raises(FileNotFoundError, match="frost.npy"):
        bf.read_cifar_c(out, ["frost"], [5])
    with pytest.raises(ValueError, match="unknown corruption"):
        bf.read_cifar_c(out, ["fgo"], [5])
    with pytest.raises(ValueError, match="severity"):
        bf.read_cifar_c(out, ["fog"], [6])
    with pytest.raises(ValueError, match="num_images"):
        bf.read_cifar_c(out, ["fog"], [5], num_images=100)
    raw = (out / "snow.npy").read_bytes()
    (out / "snow.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="snow.npy"):
        bf.read_cifar_c(out, ["snow"], [5])
    np.save(out / "fog.npy", np.zeros((30, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="fog.npy.*uint8"):
        bf.read_cifar_c(out, ["fog"], [5])
    np.save(out / "fog.npy", np.zeros((25, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        bf.read_cifar_c(out, ["fog"], [5])
    np.save(out / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="labels.npy"):
        bf.read_cifar_c(out, ["fog"], [5])


def test_builder_input_errors(tmp_path, small_images):
    images, labels = small_images
    with pytest.raises(ValueError, match="labels"):
        bf.build_c_benchmark(images, labels[:3], tmp_path, ["fog"])
    with pytest.raises(ValueError, match="uint8"):
        bf.build_c_benchmark(images.astype(np.float32), labels, tmp_path, ["fog"])
    with pytest.raises(ValueError, match="unknown corruption"):
        bf.build_c_benchmark(images, labels, tmp_path, ["fogg"])


def test_image_seeds_are_stable_and_distinct():
    a = bf.image_seeds(0, "fog", 5, 10)
    assert np.array_equal(a[:4], bf.image_seeds(0, "fog", 5, 4))
    assert len({*a, *bf.image_seeds(0, "fog", 4, 10), *bf.image_seeds(0, "snow", 5, 10)}) == 30


def test_idx_parser(tmp_path):
    data = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]) + bytes(range(8))
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data))
    assert read_idx(path, 2051).shape == (2, 2, 2)
    path.write_bytes(gzip.compress(data[:-1]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path, 2051)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "x-idx3-ubyte.gz", 2049)


def test_fashion_mnist_loads():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fashion_mnist("test", root="/nonexistent")
