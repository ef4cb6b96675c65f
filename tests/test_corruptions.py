"""Tests for metatta.data.corruptions: the 19 Hendrycks corruptions on 1- and 3-channel batches.

Reference checks use scipy, PIL, colorsys and (when installed) OpenCV as independent
implementations of the original's building blocks."""
from __future__ import annotations

import colorsys
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from metatta.data import corruptions as corr
from metatta.data.corruptions import CORRUPTIONS, RANDOM_CORRUPTIONS, corrupt
from metatta.data.domains import ALL_CORRUPTIONS

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def structured_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Real-looking test images: a colour gradient with a few flat rectangles and ellipses on it,
    stored as 8-bit levels like a benchmark's images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = []
    for _ in range(n):
        start, end = rng.random((2, channels))
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (t.max() - t.min())
        image = start[:, None, None] * (1 - t) + end[:, None, None] * t
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 10, size / 3, 2)
            if rng.random() < 0.5:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image[:, mask] = rng.random(channels)[:, None]
        images.append(image)
    return torch.tensor(np.round(np.stack(images) * 255) / 255, dtype=torch.float32)


def fashion_mnist_images(n: int) -> torch.Tensor:
    with gzip.open(FASHION_MNIST_TEST) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return torch.from_numpy(data[:n].copy()).float() / 255


IMAGE_SETS = ("gray28", "rgb32", "fashion_mnist")


@pytest.fixture(scope="module")
def image_sets() -> dict[str, torch.Tensor]:
    sets = {"gray28": structured_images(8, 1, 28, seed=3), "rgb32": structured_images(8, 3, 32, seed=4)}
    if FASHION_MNIST_TEST.is_file():
        sets["fashion_mnist"] = fashion_mnist_images(8)
    return sets


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) ** 2).mean().item()


def non_decreasing(values, rel: float = 0.02) -> bool:
    return all(later >= earlier * (1 - rel) for earlier, later in zip(values, values[1:]))


def one_minus_correlation(clean: torch.Tensor, corrupted: torch.Tensor) -> float:
    a = clean.flatten(1) - clean.flatten(1).mean(1, keepdim=True)
    b = corrupted.flatten(1) - corrupted.flatten(1).mean(1, keepdim=True)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean().item()


# Where the CIFAR-10-C table itself does not make the distance to the clean image grow with
# severity (checked against the original algorithms while writing the module; see its
# docstring), the test checks the pattern the table does imply instead.
def _glass(clean, outs, d):  # sigma (0.05, 0.25, 0.4, 0.25, 0.4), iterations (1, 1, 1, 2, 2)
    return d[3] > d[1] and d[4] > d[2]  # same sigma, a second shuffle: more damage


def _elastic(clean, outs, d):  # global affine jitter shrinks (2.56 -> 0.96 px at 32 px)
    return d[0] > d[4]


def _spatter(clean, outs, d):  # liquid at 1-3, mud at 4-5
    return non_decreasing(d[:3]) and d[4] >= d[3] * 0.98


def _frost(clean, outs, d):  # image weight falls 1 -> 0.75: MSE falls at 4-5, the share of frost grows
    return non_decreasing([one_minus_correlation(clean, y) for y in outs], rel=0.05)


def _saturate(clean, outs, d):  # S x 0.3, x 0.1 (strongest), x 1.5 (mildest), then stronger again
    return d[0] < d[1] and d[2] < d[1] and d[2] < d[3] < d[4]


def _pixelate(clean, outs, d):  # box resampling phase makes neighbouring sizes non-monotone
    return d[4] == max(d) and d[3] > d[0]


DAMAGE_PATTERNS = {
    "glass_blur": _glass, "elastic_transform": _elastic, "spatter": _spatter,
    "frost": _frost, "saturate": _saturate, "pixelate": _pixelate,
}


# ---------------------------------------------------------------------------------------------
# Every corruption, every severity
# ---------------------------------------------------------------------------------------------
def test_registry_matches_domains():
    assert list(CORRUPTIONS) == list(ALL_CORRUPTIONS)
    assert RANDOM_CORRUPTIONS < set(ALL_CORRUPTIONS)
    x = structured_images(2, 3, 32, seed=0)
    assert torch.equal(CORRUPTIONS["fog"](x, 3, [1, 2]), corrupt(x, "fog", 3, [1, 2]))


@pytest.mark.parametrize("image_set", IMAGE_SETS)
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_changes_image_keeps_format_and_damage_grows(name, image_set, image_sets):
    if image_set not in image_sets:
        pytest.skip(f"{FASHION_MNIST_TEST} not present")
    clean = image_sets[image_set]
    outs = [corrupt(clean, name, severity, 100) for severity in range(1, 6)]
    for severity, y in enumerate(outs, start=1):
        assert y.shape == clean.shape and y.dtype == torch.float32 and y.device == clean.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        change = (y - clean).abs()
        assert change.mean() > 1e-5 and change.max() > 1 / 255, f"{name}-{severity} leaves the images unchanged"
    damage = [mse(y, clean) for y in outs]
    check = DAMAGE_PATTERNS.get(name, lambda c, o, d: non_decreasing(d))
    assert check(clean, outs, damage), f"{name} on {image_set}: MSE by severity {damage}"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_seeds_batch_and_channels(name):
    for clean in (structured_images(3, 1, 28, seed=5), structured_images(3, 3, 32, seed=6)):
        seeds = [11, 12, 13]
        for severity in (2, 5):
            batch = corrupt(clean, name, severity, seeds)
            assert torch.equal(batch, corrupt(clean, name, severity, seeds)), "same seeds, different output"
            singles = torch.cat([corrupt(clean[i:i + 1], name, severity, [seeds[i]]) for i in range(3)])
            torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)
        other = corrupt(clean, name, 5, [s + 1000 for s in seeds])
        if name in RANDOM_CORRUPTIONS:
            assert not torch.equal(batch, other), "different seeds gave the same output"
        else:
            assert torch.equal(batch, other), "a deterministic corruption depends on the seed"


def test_int_seed_means_seed_plus_index_and_seed_containers_agree():
    x = structured_images(3, 3, 32, seed=7)
    expected = corrupt(x, "gaussian_noise", 3, [7, 8, 9])
    for seeds in (7, np.int64(7), np.array([7, 8, 9]), torch.tensor([7, 8, 9]), (7, 8, 9), [np.int32(7), 8, 9]):
        assert torch.equal(corrupt(x, "gaussian_noise", 3, seeds), expected)


def test_input_is_left_alone_and_empty_batch():
    x = structured_images(2, 1, 28, seed=8)
    before = x.clone()
    corrupt(x, "elastic_transform", 3, 0)
    assert torch.equal(x, before)
    empty = torch.zeros(0, 3, 32, 32)
    assert corrupt(empty, "snow", 2, []).shape == empty.shape


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 12, 20), (1, 3, 40, 33)])
def test_other_image_sizes(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for name in ALL_CORRUPTIONS:
        y = corrupt(x, name, 5, 3)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, name


@pytest.mark.parametrize("change, match", [
    (dict(corruption="fogg"), "unknown corruption 'fogg'; known: gaussian_noise"),
    (dict(severity=0), "severity"),
    (dict(severity=6), "severity"),
    (dict(severity=2.0), "severity"),
    (dict(severity=True), "severity"),
    (dict(images=np.zeros((2, 1, 8, 8), np.float32)), "torch.Tensor"),
    (dict(images=torch.rand(2, 28, 28)), r"\(B, C, H, W\)"),
    (dict(images=torch.rand(2, 1, 8, 8).double()), "float32"),
    (dict(images=torch.rand(2, 2, 8, 8)), "1 or 3 channels"),
    (dict(images=torch.rand(2, 1, 4, 8)), "at least 8x8"),
    (dict(images=torch.full((2, 1, 8, 8), float("nan"))), "NaN"),
    (dict(images=torch.full((2, 1, 8, 8), 1.5)), r"\[0, 1\]"),
    (dict(images=torch.full((2, 1, 8, 8), -0.1)), r"\[0, 1\]"),
    (dict(seeds=[1, 2, 3]), "3 seeds for 2 images"),
    (dict(seeds=[1, -2]), r"seeds\[1\]"),
    (dict(seeds=[1.0, 2.0]), r"seeds\[0\] must be an int"),
    (dict(seeds=torch.tensor([[1, 2]])), "1-D integer"),
    (dict(seeds=np.array([1.5, 2.5])), "1-D integer"),
    (dict(seeds="12"), "seeds must be an int or a sequence"),
    (dict(seeds=2 ** 63 - 1), "seed \\+ batch size - 1"),
])
def test_bad_input_is_refused(change, match):
    args = dict(images=torch.rand(2, 1, 8, 8), corruption="fog", severity=1, seeds=[1, 2])
    args.update(change)
    with pytest.raises(ValueError, match=match):
        corrupt(args["images"], args["corruption"], args["severity"], args["seeds"])


# ---------------------------------------------------------------------------------------------
# Against independent implementations of the original's steps (32x32 RGB: no size scaling)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    return structured_images(4, 3, 32, seed=9)


def _hsv_reference(x: torch.Tensor, edit) -> torch.Tensor:
    """Per pixel through colorsys (same hue conventions as skimage's rgb2hsv/hsv2rgb)."""
    array = x.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    out = np.array([colorsys.hsv_to_rgb(*edit(*colorsys.rgb_to_hsv(*pixel))) for pixel in array])
    return torch.from_numpy(np.clip(out, 0, 1)).float().view(x.shape[0], x.shape[2], x.shape[3], 3).permute(0, 3, 1, 2)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_brightness_and_saturate_match_hsv(rgb, severity):
    add = corr.BRIGHTNESS[severity - 1]
    expected = _hsv_reference(rgb, lambda h, s, v: (h, s, min(v + add, 1)))
    torch.testing.assert_close(corrupt(rgb, "brightness", severity, 0), expected, atol=1e-5, rtol=0)
    factor, offset = corr.SATURATE[severity - 1]
    expected = _hsv_reference(rgb, lambda h, s, v: (h, min(max(s * factor + offset, 0), 1), v))
    torch.testing.assert_close(corrupt(rgb, "saturate", severity, 0), expected, atol=1e-5, rtol=0)


def test_gray_brightness_adds_and_gray_saturate_uses_the_white_point():
    x = structured_images(2, 1, 28, seed=10)
    torch.testing.assert_close(corrupt(x, "brightness", 2, 0), (x + 0.1).clamp(max=1))
    white = x.amax(dim=(2, 3), keepdim=True)
    factor, offset = corr.SATURATE[3]
    expected = white * (1 - ((1 - x / white) * factor + offset).clamp(0, 1))
    torch.testing.assert_close(corrupt(x, "saturate", 4, 0), expected)


def test_contrast_gaussian_blur_zoom_blur_match_scipy(rgb):
    from scipy.ndimage import gaussian_filter, zoom

    array = rgb.double().numpy()
    means = array.mean(axis=(2, 3), keepdims=True)
    expected = np.clip((array - means) * corr.CONTRAST[2] + means, 0, 1)
    torch.testing.assert_close(corrupt(rgb, "contrast", 3, 0), torch.from_numpy(expected).float(), atol=1e-6, rtol=0)

    sigma = corr.GAUSSIAN_BLUR[4]
    expected = np.clip(gaussian_filter(array, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0), 0, 1)
    torch.testing.assert_close(corrupt(rgb, "gaussian_blur", 5, 0), torch.from_numpy(expected).float(),
                               atol=1e-5, rtol=0)

    def clipped_zoom(image, factor):  # the CIFAR script's, on (C, H, W)
        h = image.shape[1]
        ch = int(np.ceil(h / factor))
        top = (h - ch) // 2
        image = zoom(image[:, top:top + ch, top:top + ch], (1, factor, factor), order=1)
        trim = (image.shape[1] - h) // 2
        return image[:, trim:trim + h, trim:trim + h]

    factors = np.arange(1, corr.ZOOM_BLUR_MAX[3], 0.01)
    expected = np.stack([(image + sum(clipped_zoom(image, f) for f in factors)) / (len(factors) + 1)
                         for image in array])
    torch.testing.assert_close(corrupt(rgb, "zoom_blur", 4, 0), torch.from_numpy(expected).float(),
                               atol=1e-5, rtol=0)


def test_pixelate_and_jpeg_match_pil(rgb):
    from PIL import Image

    levels = (rgb * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for severity in (1, 5):
        small = int(32 * corr.PIXELATE[severity - 1])
        expected = np.stack([
            np.asarray(Image.fromarray(im).resize((small, small), Image.BOX).resize((32, 32), Image.BOX))
            for im in levels])
        got = corrupt(rgb, "pixelate", severity, 0).permute(0, 2, 3, 1).numpy() * 255
        assert np.abs(got - expected).max() <= 1.0 + 1e-3  # PIL rounds to 8 bits between passes

        def pil_jpeg(im, quality=corr.JPEG_QUALITY[severity - 1]):
            buffer = io.BytesIO()
            Image.fromarray(im).save(buffer, "JPEG", quality=quality)
            return np.asarray(Image.open(buffer))

        expected = np.stack([pil_jpeg(im) for im in levels]).astype(np.float64)
        got = corrupt(rgb, "jpeg_compression", severity, 0).permute(0, 2, 3, 1).numpy() * 255
        assert np.abs(got - expected).mean() < 0.5 and np.abs(got - expected).max() <= 4


def test_defocus_and_elastic_match_opencv(rgb):
    cv2 = pytest.importorskip("cv2")
    from scipy.ndimage import map_coordinates

    array = rgb.permute(0, 2, 3, 1).numpy()
    for severity in (1, 5):
        radius, alias = corr.DEFOCUS_BLUR[severity - 1]
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
        kernel = cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias)
        expected = np.stack([cv2.filter2D(im, -1, kernel) for im in array]).clip(0, 1)
        got = corrupt(rgb, "defocus_blur", severity, 0).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)

    seeds = [3, 4, 5, 6]
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    for severity in (1, 4):
        forward, shifts = corr._elastic_parameters(seeds, 32, 32, severity, "cpu")
        got = corrupt(rgb, "elastic_transform", severity, seeds).permute(0, 2, 3, 1).numpy()
        for i, image in enumerate(array):
            warped = cv2.warpAffine(image, forward[i].numpy(), (32, 32), borderMode=cv2.BORDER_REFLECT_101)
            coords = [yy + shifts[i, 1].numpy(), xx + shifts[i, 0].numpy()]
            expected = np.stack([map_coordinates(warped[..., c], coords, order=1, mode="reflect")
                                 for c in range(3)], -1)
            np.testing.assert_allclose(got[i], expected.clip(0, 1), atol=1e-4)


def test_elastic_table_shifts_from_affine_to_local_warp():
    jitter, local = [], []
    for severity in range(1, 6):
        forward, shifts = corr._elastic_parameters(list(range(16)), 32, 32, severity, "cpu")
        identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
        jitter.append((forward - identity).abs().amax().item())
        local.append(shifts.pow(2).mean().sqrt().item())
    assert jitter == sorted(jitter, reverse=True) and local == sorted(local), (jitter, local)


def test_spatter_liquid_steps_match_opencv():
    cv2 = pytest.importorskip("cv2")
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    for trial in range(12):
        liquid = gaussian_filter(rng.normal(0.65, 0.3, (28, 28)), 1.0, mode="nearest")
        liquid[liquid < 0.69] = 0
        levels = (liquid * 255).astype(np.uint8)
        layer = torch.from_numpy(levels).float()[None, None]
        edges = cv2.Canny(levels, 50, 150)
        assert torch.equal(corr._canny(layer, 50, 150)[0, 0], torch.from_numpy(edges > 0))
        distance = cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5).clip(max=20)
        got = corr._chamfer_distance(torch.from_numpy(edges > 0)[None, None], 20.0)[0, 0].numpy()
        np.testing.assert_allclose(got, distance, atol=1e-3)
        blurred = cv2.blur(distance, (3, 3)).astype(np.uint8)
        got = corr._equalize_hist(torch.from_numpy(blurred).float()[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(got, cv2.equalizeHist(blurred))


def test_noise_statistics():
    x = torch.full((4, 3, 32, 32), 0.5)
    noise = corrupt(x, "gaussian_noise", 5, 0) - x
    assert abs(noise.std().item() - corr.GAUSSIAN_NOISE[4]) < 0.005 and abs(noise.mean().item()) < 0.005
    photons = corr.SHOT_NOISE[4]
    shot = corrupt(x, "shot_noise", 5, 0)
    assert abs(shot.mean().item() - 0.5) < 0.01 and abs(shot.var().item() - 0.5 / photons) < 0.1 * 0.5 / photons
    impulse = corrupt(x, "impulse_noise", 5, 0)
    assert abs((impulse == 1).float().mean().item() - corr.IMPULSE_NOISE[4] / 2) < 0.01
    assert abs((impulse == 0).float().mean().item() - corr.IMPULSE_NOISE[4] / 2) < 0.01
    speckle = corrupt(x, "speckle_noise", 5, 0) - x
    assert abs(speckle.std().item() - 0.5 * corr.SPECKLE_NOISE[4]) < 0.005


def test_motion_blur_kernel_is_a_one_sided_gaussian_line():
    image = torch.zeros(2, 1, 33, 33)
    image[:, :, 16, 16] = 1
    out = corr._motion_blur(image, 6, 2, torch.tensor([0.0, 90.0], dtype=torch.float64))
    taps = np.exp(-np.arange(13) ** 2 / 8)
    taps /= taps.sum()
    # out(p) sums taps[i] * in(p + i * direction): the impulse spreads against the direction
    np.testing.assert_allclose(out[0, 0, 16, 4:17].numpy()[::-1], taps, atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 4:17, 16].numpy()[::-1], taps, atol=1e-6)
    assert abs(out.sum().item() - 2) < 1e-5


def test_plasma_fractal_and_fog_map():
    count = corr._plasma_draws(32)
    assert count == 3 * (1 + 4 + 16 + 64 + 256)
    uniforms = torch.rand(3, count, generator=torch.Generator().manual_seed(0))
    plasma = corr._plasma_fractal(uniforms, 32, 2.0)
    assert plasma.shape == (3, 32, 32)
    assert torch.allclose(plasma.amin(dim=(1, 2)), torch.zeros(3))
    assert torch.allclose(plasma.amax(dim=(1, 2)), torch.ones(3))
    # a plasma is smooth: neighbours are far closer than random pixels
    assert (plasma[:, 1:] - plasma[:, :-1]).abs().mean() < 0.5 * (plasma - plasma.flip(1, 2)).abs().mean()


def test_frost_textures_gray_and_missing_package(monkeypatch):
    rgb_textures = corr._frost_textures(3, 0.2)
    gray_textures = corr._frost_textures(1, 0.2)
    assert len(rgb_textures) == 5 and all(t.shape[0] == 3 and t.shape[1] > 32 for t in rgb_textures)
    weights = torch.tensor(corr.LUMA).view(3, 1, 1)
    torch.testing.assert_close(gray_textures[0], (rgb_textures[0] * weights).sum(0, keepdim=True))
    x = torch.zeros(2, 1, 28, 28)  # a black image shows the frost crop alone, scaled by its weight
    frost = corrupt(x, "frost", 5, [1, 2]) / corr.FROST[4][1]
    assert 0.05 < frost.mean() < 1
    monkeypatch.setattr(corr.importlib.util, "find_spec", lambda name: None)
    corr._frost_sources.cache_clear()
    corr._frost_textures.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="imagecorruptions"):
            corrupt(x, "frost", 1, 0)
    finally:
        monkeypatch.undo()
        corr._frost_sources.cache_clear()
        corr._frost_textures.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_matches_cpu(name):
    x = structured_images(4, 3, 32, seed=11)
    cpu = corrupt(x, name, 4, 5)
    gpu = corrupt(x.cuda(), name, 4, 5)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert (gpu.cpu() - cpu).abs().mean() < 2e-3
