"""-C benchmark files: building Fashion-MNIST-C on real data, build-once and interruption safety,
the CIFAR-10-C style reader and its errors, the ImageNet-C reader."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from metatta.data import benchmark_files as bf
from metatta.data.corruptions import VERSION
from metatta.data.fashion_mnist import load_fashion_mnist
from metatta.data.streams import build_stream

CORRUPTIONS = ["gaussian_noise", "contrast", "fog"]
N = 50


@pytest.fixture(scope="module")
def clean():
    try:
        images, labels = load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    return images[:N], labels[:N]


@pytest.fixture(scope="module")
def built(tmp_path_factory, clean):
    """A real Fashion-MNIST-C of 50 images x 3 corruptions (real corruption code)."""
    root = tmp_path_factory.mktemp("fmnist_c")
    return bf.fashion_mnist_c(root=root, num_images=N, corruptions=CORRUPTIONS, progress=False)


def fake_corrupt(x, corruption, severity, seeds):
    return (x * (1 - 0.1 * severity)).clamp(0, 1)


def fail(*args, **kwargs):
    raise AssertionError("corrupt() must not be called: everything is built already")


# ---- building ---------------------------------------------------------------------------------------
def test_layout_and_manifest(built, clean):
    images, labels = clean
    for c in CORRUPTIONS:
        data = np.load(built / f"{c}.npy")
        assert data.shape == (5 * N, 28, 28, 1) and data.dtype == np.uint8
    stored = np.load(built / "labels.npy")
    assert stored.dtype == np.int64 and np.array_equal(stored, np.tile(labels, 5))
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["identity"] == {"source": "fashion_mnist/test", "num_images": N, "seed": 0,
                                    "shape": [28, 28, 1], "corruptions_version": VERSION}
    assert manifest["corruptions"] == ["gaussian_noise", "fog", "contrast"]  # ALL_CORRUPTIONS order
    assert manifest["severities"] == [1, 2, 3, 4, 5]
    for name in ["labels.npy"] + [f"{c}.npy" for c in CORRUPTIONS]:
        assert manifest["files"][name] == bf._sha256(built / name)
        assert manifest["file_info"][name]["versions"]["metatta"]
    assert not list(built.glob("*.partial")) and not list(built.glob(".*.partial"))


def test_severity_blocks_hold_increasing_damage(built, clean):
    images, _ = clean
    for c in ("gaussian_noise", "contrast"):
        data = np.load(built / f"{c}.npy").astype(float)
        damage = [np.abs(data[(s - 1) * N: s * N] - images).mean() for s in range(1, 6)]
        assert all(a < b for a, b in zip(damage, damage[1:])), (c, damage)


def test_subset_is_identical_to_rows_of_the_full_build(tmp_path, built, clean):
    images, labels = clean
    small = bf.build_c_benchmark(images[:7], labels[:7], tmp_path / "small", ["gaussian_noise"],
                                 source="fashion_mnist/test", progress=False, batch_size=3)
    full, part = np.load(built / "gaussian_noise.npy"), np.load(small / "gaussian_noise.npy")
    for s in range(5):
        assert np.array_equal(part[s * 7:(s + 1) * 7], full[s * N: s * N + 7])
    assert not np.array_equal(part[:7], part[7:14])  # severities use different seeds


def test_rebuild_skips_matching_files(built, clean, monkeypatch):
    images, labels = clean
    mtimes = {p.name: p.stat().st_mtime_ns for p in built.glob("*.npy")}
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fail)
    bf.fashion_mnist_c(root=built, num_images=N, corruptions=CORRUPTIONS, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in built.glob("*.npy")} == mtimes


def test_interrupted_build_keeps_finished_files_and_resumes(tmp_path, clean, monkeypatch):
    images, labels = clean
    calls = []

    def dies_on_snow(x, corruption, severity, seeds):
        calls.append(corruption)
        if corruption == "snow":
            raise RuntimeError("killed midway")
        return fake_corrupt(x, corruption, severity, seeds)

    monkeypatch.setattr("metatta.data.corruptions.corrupt", dies_on_snow)
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="midway"):
        bf.build_c_benchmark(images, labels, out, ["fog", "snow", "frost"], progress=False, batch_size=20)
    assert (out / "fog.npy").is_file() and not (out / "snow.npy").exists() and not (out / "frost.npy").exists()
    assert not list(out.glob(".*.partial"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"labels.npy", "fog.npy"}
    fog_mtime = (out / "fog.npy").stat().st_mtime_ns
    (out / ".snow.npy.999.deadbeef.partial").write_bytes(b"left by a SIGKILLed builder")
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    calls.clear()
    bf.build_c_benchmark(images, labels, out, ["fog", "snow", "frost"], progress=False)
    assert (out / "fog.npy").stat().st_mtime_ns == fog_mtime
    assert np.load(out / "snow.npy").shape == (5 * N, 28, 28, 1)
    assert not list(out.glob(".*.partial"))
    assert set(json.loads((out / "manifest.json").read_text())["corruptions"]) == {"fog", "snow", "frost"}


def test_tampered_file_is_rebuilt_identically(tmp_path, clean, monkeypatch):
    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog"], progress=False)
    original = np.load(out / "fog.npy")
    data = np.load(out / "fog.npy", mmap_mode="r+")
    data[3] = 255 - data[3]  # same size, different content
    data.flush()
    del data
    bf.build_c_benchmark(images, labels, out, ["fog"], progress=False)
    assert np.array_equal(np.load(out / "fog.npy"), original)


def test_old_manifest_without_file_info_is_verified_by_hash(tmp_path, clean, monkeypatch):
    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog"], progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    old = {"identity": manifest["identity"], "files": manifest["files"]}  # the first manifest format
    (out / "manifest.json").write_text(json.dumps(old))
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fail)
    bf.build_c_benchmark(images, labels, out, ["fog"], progress=False)
    assert "fog.npy" in json.loads((out / "manifest.json").read_text())["file_info"]


def test_concurrent_builders_of_one_directory(tmp_path, clean, monkeypatch):
    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    out, errors = tmp_path / "c", []

    def build():
        try:
            bf.build_c_benchmark(images, labels, out, ["fog", "snow"], progress=False, batch_size=10)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == {"labels.npy", "fog.npy", "snow.npy"}
    assert bf.read_cifar_c(out, ["fog", "snow"], [1])[0].images.shape == (N, 28, 28, 1)


def test_directory_of_another_benchmark_is_refused(built, clean):
    images, labels = clean
    with pytest.raises(ValueError, match="different benchmark"):
        bf.build_c_benchmark(images[:10], labels[:10], built, ["fog"], source="fashion_mnist/test", progress=False)
    with pytest.raises(ValueError, match="different benchmark"):
        bf.build_c_benchmark(images, labels, built, ["fog"], seed=1, source="fashion_mnist/test", progress=False)


def test_other_clean_data_with_the_same_identity_is_refused(tmp_path, clean, monkeypatch):
    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    out = bf.build_c_benchmark(images, labels, tmp_path / "c", ["fog"], progress=False)
    with pytest.raises(ValueError, match="other clean images or labels"):
        bf.build_c_benchmark(images, (labels + 1) % 10, out, ["fog"], progress=False)
    with pytest.raises(ValueError, match="other clean images or labels"):
        bf.build_c_benchmark(255 - images, labels, out, ["snow"], progress=False)
    assert not (out / "snow.npy").exists()


def test_files_not_built_here_are_never_overwritten(tmp_path, clean, monkeypatch):
    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    downloaded = np.full((5 * N, 28, 28, 1), 7, np.uint8)  # e.g. a CIFAR-10-C copy, no manifest
    np.save(tmp_path / "fog.npy", downloaded)
    with pytest.raises(ValueError, match="without a manifest.json.*fog.npy"):
        bf.build_c_benchmark(images, labels, tmp_path, ["fog"], progress=False)
    assert np.array_equal(np.load(tmp_path / "fog.npy"), downloaded) and not (tmp_path / "labels.npy").exists()


def test_unreadable_manifest_named(tmp_path, clean):
    images, labels = clean
    (tmp_path / "manifest.json").write_text('{"identity": {"sou')
    with pytest.raises(ValueError, match="manifest.json"):
        bf.build_c_benchmark(images, labels, tmp_path, ["fog"], progress=False)


@pytest.mark.parametrize("change, match", [
    (lambda x, y: (x, y[:3]), "labels"),
    (lambda x, y: (x.astype(np.float32), y), "uint8"),
    (lambda x, y: (np.repeat(x, 2, axis=3), y), "C in 1 or 3"),
    (lambda x, y: (x[..., 0], y), "uint8 array \\(N, H, W, C\\)"),
    (lambda x, y: (x[:0], y[:0]), "no images"),
    (lambda x, y: (x, y.astype(float)), "integer"),
])
def test_builder_input_errors(tmp_path, clean, change, match):
    images, labels = change(*clean)
    with pytest.raises(ValueError, match=match):
        bf.build_c_benchmark(images, labels, tmp_path, ["fog"], progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"corruptions": ["fogg"]}, "unknown corruption"),
    ({"severities": [1, 2, 3]}, "all five severities"),
    ({"severities": [0, 1, 2, 3, 4]}, "severity"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
])
def test_builder_argument_errors(tmp_path, clean, kwargs, match):
    images, labels = clean
    with pytest.raises(ValueError, match=match):
        bf.build_c_benchmark(images, labels, tmp_path, **{"corruptions": ["fog"], "progress": False, **kwargs})
    assert not (tmp_path / "fog.npy").exists()


def test_fashion_mnist_c_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("METATTA_CACHE", str(tmp_path))
    out = bf.fashion_mnist_c(num_images=12, corruptions=["contrast"], progress=False)
    assert out == tmp_path / f"fashion_mnist_c-n12-s0-v{VERSION}"
    assert bf.fashion_mnist_c(num_images=13, corruptions=["contrast"], progress=False) != out
    assert np.load(out / "contrast.npy").shape == (60, 28, 28, 1)
    for bad in (0, 10_001, 2.5):
        with pytest.raises(ValueError, match="num_images"):
            bf.fashion_mnist_c(num_images=bad)


def test_image_seeds():
    a = bf.image_seeds(0, "fog", 5, 10)
    assert a.dtype == np.int64 and np.array_equal(a[:4], bf.image_seeds(0, "fog", 5, 4))
    assert np.array_equal(a[6:], bf.image_seeds(0, "fog", 5, 4, start=6))
    seeds = [bf.image_seeds(seed, c, s, 100) for seed in (0, 1) for c in ("fog", "snow") for s in (1, 2, 5)]
    assert len(np.unique(np.concatenate(seeds))) == 1200
    for args, match in [((-1, "fog", 1, 3), "seed"), ((0, "fgo", 1, 3), "unknown corruption"),
                        ((0, "fog", 6, 3), "severity"), ((0, "fog", 1, bf.MAX_IMAGES + 1), "image indices")]:
        with pytest.raises(ValueError, match=match):
            bf.image_seeds(*args)


# ---- CIFAR-10-C style reader ------------------------------------------------------------------------
def test_reader_round_trip(built, clean):
    _, labels = clean
    domains = bf.read_cifar_c(built, ["contrast", "fog"], [5, 1], num_images=20)
    assert [d.name for d in domains] == ["contrast-5", "contrast-1", "fog-5", "fog-1"]
    fog = np.load(built / "fog.npy")
    assert isinstance(domains[2].images, np.memmap) and not domains[2].images.flags.writeable
    assert np.array_equal(domains[2].images, fog[4 * N: 4 * N + 20])
    assert np.array_equal(domains[3].images, fog[:20])
    assert all(d.labels.dtype == np.int64 and np.array_equal(d.labels, labels[:20]) for d in domains)
    assert len(bf.read_cifar_c(built, ["fog"], [3])[0]) == N


def test_reader_first_image_skips_the_leading_images(built, clean):
    _, labels = clean
    fog = np.load(built / "fog.npy")
    (d,) = bf.read_cifar_c(built, ["fog"], [5], num_images=5, first_image=3)
    assert np.array_equal(d.images, fog[4 * N + 3: 4 * N + 8]) and np.array_equal(d.labels, labels[3:8])
    (rest,) = bf.read_cifar_c(built, ["fog"], [1], first_image=N - 2)
    assert len(rest) == 2
    for kwargs, match in [({"first_image": -1}, "first_image"), ({"first_image": N}, "first_image"),
                          ({"first_image": True}, "first_image"), ({"first_image": 2, "num_images": N - 1}, "exceeds")]:
        with pytest.raises(ValueError, match=match):
            bf.read_cifar_c(built, ["fog"], [5], **kwargs)


def test_reader_accepts_cifar10c_uint8_labels(tmp_path):
    n = 4
    np.save(tmp_path / "labels.npy", np.tile(np.arange(n, dtype=np.uint8), 5))
    np.save(tmp_path / "fog.npy", np.zeros((5 * n, 32, 32, 3), np.uint8))
    (d,) = bf.read_cifar_c(tmp_path, ["fog"], [2])
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [0, 1, 2, 3] and d.images.shape == (4, 32, 32, 3)


@pytest.fixture
def copy_of(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def test_reader_missing_files(copy_of, tmp_path):
    with pytest.raises(FileNotFoundError, match="frost.npy"):
        bf.read_cifar_c(copy_of, ["frost"], [5])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bf.read_cifar_c(tmp_path / "nowhere", ["fog"], [5])
    (copy_of / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        bf.read_cifar_c(copy_of, ["fog"], [5])


def replace_bytes_keeping_size_and_mtime(path, row):
    st = path.stat()
    data = np.load(path, mmap_mode="r+")
    data[row] = 255 - data[row]
    data.flush()
    del data
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_replaced_bytes_with_the_same_size_and_mtime_are_detected(copy_of, monkeypatch):
    original = np.load(copy_of / "fog.npy")
    bf.read_cifar_c(copy_of, ["fog"], [5])  # verified once in this process
    replace_bytes_keeping_size_and_mtime(copy_of / "fog.npy", 4 * N + 3)
    with pytest.raises(ValueError, match=r"fog.npy: its bytes differ from the sha256 recorded in .*manifest.json"):
        bf.read_cifar_c(copy_of, ["fog"], [5])
    monkeypatch.setattr(bf, "_HASHED", {})  # a fresh process
    with pytest.raises(ValueError, match="fog.npy: its bytes differ"):
        bf.read_cifar_c(copy_of, ["fog"], [5])
    # the builder (what fashion_mnist_c runs before reading) finds it too, and rebuilds it identically
    root = bf.fashion_mnist_c(root=copy_of, num_images=N, corruptions=CORRUPTIONS, progress=False)
    assert np.array_equal(np.load(copy_of / "fog.npy"), original)
    assert np.array_equal(bf.read_cifar_c(root, ["fog"], [5])[0].images, original[4 * N:])
    replace_bytes_keeping_size_and_mtime(copy_of / "labels.npy", 7)
    with pytest.raises(ValueError, match="labels.npy: its bytes differ"):
        bf.read_cifar_c(copy_of, ["contrast"], [5])


def test_contents_are_hashed_once_per_process(copy_of, monkeypatch):
    hashed = []
    real = bf._sha256
    monkeypatch.setattr(bf, "_sha256", lambda path: hashed.append(path.name) or real(path))
    monkeypatch.setattr(bf, "_HASHED", {})
    for _ in range(3):
        bf.read_cifar_c(copy_of, ["fog", "contrast"], [5])
    assert sorted(hashed) == ["contrast.npy", "fog.npy", "labels.npy"]


def test_reader_truncated_files(copy_of):
    raw = (copy_of / "fog.npy").read_bytes()
    (copy_of / "fog.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="fog.npy.*truncated"):
        bf.read_cifar_c(copy_of, ["fog"], [5])
    (copy_of / "fog.npy").write_bytes(raw[:40])  # header cut
    with pytest.raises(ValueError, match="fog.npy"):
        bf.read_cifar_c(copy_of, ["fog"], [5])
    raw = (copy_of / "labels.npy").read_bytes()
    (copy_of / "labels.npy").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match="labels.npy.*truncated"):
        bf.read_cifar_c(copy_of, ["contrast"], [5])


@pytest.mark.parametrize("array, match", [
    (np.zeros((5 * N, 28, 28, 1), np.float32), "fog.npy: expected dtype uint8, got float32"),
    (np.zeros((5 * N, 28, 28), np.uint8), "fog.npy: expected shape"),
    (np.zeros((5 * N, 28, 28, 2), np.uint8), "fog.npy: expected shape"),
    (np.zeros((5 * N - 1, 28, 28, 1), np.uint8), "fog.npy: 249 rows is not a multiple of 5"),
    (np.zeros((5 * N - 5, 28, 28, 1), np.uint8), "fog.npy: 245 images but .*labels.npy has 250"),
])
def test_reader_bad_image_file(copy_of, array, match):
    np.save(copy_of / "fog.npy", array)
    with pytest.raises(ValueError, match=match):
        bf.read_cifar_c(copy_of, ["fog"], [1])


@pytest.mark.parametrize("labels, match", [
    (np.zeros(5 * N - 1, np.int64), "labels.npy: 249 labels is not a positive multiple of 5"),
    (np.zeros(0, np.int64), "labels.npy: 0 labels"),
    (np.zeros(5 * N, np.float32), "labels.npy: expected a 1-D integer"),
    (np.zeros((5 * N, 1), np.int64), "labels.npy: expected a 1-D integer"),
    (np.full(5 * N, -1, np.int64), "labels.npy: negative"),
    (np.zeros(5 * N + 5, np.int64), "fog.npy: 250 images but .*labels.npy has 255"),
])
def test_reader_bad_labels(copy_of, labels, match):
    np.save(copy_of / "labels.npy", labels)
    with pytest.raises(ValueError, match=match):
        bf.read_cifar_c(copy_of, ["fog"], [1])


@pytest.mark.parametrize("kwargs, match", [
    ({"corruptions": ["fgo"]}, "unknown corruption"),
    ({"severities": [6]}, "severity"),
    ({"severities": [0]}, "severity"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": N + 1}, "num_images"),
])
def test_reader_argument_errors(built, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bf.read_cifar_c(built, **{"corruptions": ["fog"], "severities": [1], **kwargs})


def test_pickled_npy_refused(tmp_path):
    np.save(tmp_path / "labels.npy", np.zeros(5, np.int64))
    np.save(tmp_path / "fog.npy", np.array([object()] * 5), allow_pickle=True)
    with pytest.raises(ValueError, match="fog.npy"):
        bf.read_cifar_c(tmp_path, ["fog"], [1])


# ---- ImageNet-C -------------------------------------------------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def imagenet_c(tmp_path):
    """root/fog/{1,5}/<wnid>/img<k>.JPEG, 2 images per class; the pixel value encodes (class, k)."""
    from PIL import Image

    root = tmp_path / "imagenet-c"
    for s in (1, 5):
        for c, wnid in enumerate(WNIDS):
            folder = root / "fog" / str(s) / wnid
            folder.mkdir(parents=True)
            for k in range(2):
                size = (16, 16) if (c, k) != (2, 1) else (40, 24)  # one image needs resize + crop
                Image.new("RGB", size, (40 * c + 10 * k, s, 0)).save(folder / f"img{k}.JPEG", quality=100)
    return root


def test_imagenet_c_reader_is_lazy_and_labels_by_sorted_wnid(imagenet_c):
    domains = bf.read_imagenet_c(imagenet_c, ["fog"], [5, 1], image_size=16)
    assert [d.name for d in domains] == ["fog-5", "fog-1"]
    d = domains[0]
    assert isinstance(d.images, bf.ImageFileArray) and d.images.shape == (6, 16, 16, 3)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = d.images[0]
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8 and abs(int(first[..., 1].mean()) - 5) <= 2
    picked = d.images[np.array([5, 2])]
    assert picked.shape == (2, 16, 16, 3)
    assert abs(int(picked[0, ..., 0].mean()) - 90) <= 3 and abs(int(picked[1, ..., 0].mean()) - 40) <= 3
    stream = build_stream(domains, "episodic", 4, seed=0)
    batches = list(stream)
    assert [len(b.y) for b in batches] == [4, 2, 4, 2] and batches[0].x.shape == (4, 3, 16, 16)
    red = {round(float(v) * 255 / 40) for b in batches for v in b.x[:, 0].mean((1, 2))}
    assert {int(y) for b in batches for y in b.y} == {0, 1, 2} and red <= {0, 1, 2, 3}


def test_imagenet_c_subset_lists(imagenet_c, tmp_path):
    listing = tmp_path / "imagenet_test_image_ids.txt"
    listing.write_text(f"# robustbench style\n{WNIDS[2]}/img1.JPEG\n\n{WNIDS[0]}/img0.JPEG\n")
    (d,) = bf.read_imagenet_c(imagenet_c, ["fog"], [1], subset_list=listing, image_size=16)
    assert d.labels.tolist() == [2, 0] and len(d.images) == 2
    listing.write_text(f"{WNIDS[1]}/img0.JPEG 1\n./{WNIDS[2]}/img0.JPEG 2\n")  # "path label" style
    (d,) = bf.read_imagenet_c(imagenet_c, ["fog"], [1], subset_list=listing, image_size=16)
    assert d.labels.tolist() == [1, 2]
    for text, error, match in [
        (f"{WNIDS[1]}/img0.JPEG 7\n", ValueError, ":1: label 7 .*another class order"),
        (f"{WNIDS[1]}/img0.JPEG\nn99999999/x.JPEG\n", ValueError, ":2: .*class folder"),
        (f"{WNIDS[1]}/img0.JPEG 1 extra\n", ValueError, ":1: expected"),
        ("\n# nothing\n", ValueError, "empty"),
        (f"{WNIDS[1]}/img9.JPEG\n", FileNotFoundError, "1 image.*missing.*img9.JPEG"),
    ]:
        listing.write_text(text)
        with pytest.raises(error, match=match):
            bf.read_imagenet_c(imagenet_c, ["fog"], [1], subset_list=listing)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        bf.read_imagenet_c(imagenet_c, ["fog"], [1], subset_list=tmp_path / "nolist.txt")


def test_imagenet_c_errors(imagenet_c, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="fog/3"):
        bf.read_imagenet_c(imagenet_c, ["fog"], [3])
    with pytest.raises(FileNotFoundError, match="snow"):
        bf.read_imagenet_c(imagenet_c, ["snow"], [1])
    with pytest.raises(ValueError, match="unknown corruption"):
        bf.read_imagenet_c(imagenet_c, ["fogg"], [1])
    with pytest.raises(ValueError, match="image_size"):
        bf.read_imagenet_c(imagenet_c, ["fog"], [1], image_size=0)
    shutil.rmtree(imagenet_c / "fog" / "5" / WNIDS[1])
    with pytest.raises(ValueError, match="fog/5: class folders differ"):
        bf.read_imagenet_c(imagenet_c, ["fog"], [1, 5])
    (imagenet_c / "fog" / "1" / WNIDS[0] / "img0.JPEG").write_bytes(b"not a jpeg")
    (d,) = bf.read_imagenet_c(imagenet_c, ["fog"], [1], image_size=16)  # lazy: nothing decoded yet
    with pytest.raises(ValueError, match="img0.JPEG: cannot decode"):
        d.images[0]


def test_imagenet_c_grouped_layout(imagenet_c):
    grouped = imagenet_c / "weather"
    grouped.mkdir()
    (imagenet_c / "fog").rename(grouped / "fog")
    (d,) = bf.read_imagenet_c(imagenet_c, ["fog"], [5], image_size=16)
    assert len(d) == 6 and isinstance(d.images[[0]], np.ndarray)
    assert torch.is_tensor(next(iter(build_stream([d], "continual", 6))).x)


def test_an_experiment_caps_num_images_to_what_a_small_benchmark_holds(tmp_path, clean, monkeypatch, caplog):
    """A digits-sized dataset: a config's 1,000 images per domain become the N there are, with a warning."""
    import logging

    from metatta.experiment import BenchmarkConfig, images_used, load_domains

    images, labels = clean
    monkeypatch.setattr("metatta.data.corruptions.corrupt", fake_corrupt)
    root = bf.build_c_benchmark(images, labels, tmp_path / "small", ["fog"], progress=False)
    cfg = BenchmarkConfig(root=str(root), corruptions=["fog"], severities=[5], num_images=1000, first_image=10)
    with caplog.at_level(logging.WARNING, logger="metatta.data.benchmark_files"):
        domains = load_domains(cfg)
    assert len(domains[0].labels) == N - 10 and images_used(cfg, domains) == N - 10
    assert "benchmark.num_images: 1000 asked" in caplog.text and f"using {N - 10}" in caplog.text
    assert bf.capped_num_images(root, 20) == 20 and bf.capped_num_images(root, None) is None
    assert images_used(BenchmarkConfig(num_images=None), domains) is None
    assert bf.images_per_severity(root) == N
