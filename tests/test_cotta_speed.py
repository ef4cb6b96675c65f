"""CoTTA's batched views: `cotta_augment_views` against `cotta_augment`, and the one-call teacher
forward over all views (vmap over the view dimension) against the loop of forwards."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metatta.methods import build_method
from metatta.methods.augment import (
    SOFT,
    CoTTAAugment,
    STRONG,
    ViewParams,
    _uniform,
    apply_view_params,
    cotta_augment,
    cotta_augment_views,
    draw_view_params,
)

NUM_CLASSES = 10


class SmallBNNet(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU (stride 2), global pool, linear."""

    def __init__(self, seed: int = 0, in_channels: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, NUM_CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(10.0)
            for bn in (self.layer1[1], self.layer2[1]):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
        self.eval()

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def params_like_cotta_augment(x: torch.Tensor, generator: torch.Generator, soft: bool = False, noise_std=0.005):
    """Consume `generator` exactly as one `cotta_augment(x, generator=...)` call does, returning
    its parameters as a one-view ViewParams and its (scaled) noise."""
    ranges = SOFT if soft else STRONG
    height, width = x.shape[-2:]
    padded_h, padded_w = height + 2 * (height // 2), width + 2 * (width // 2)
    order = torch.randperm(5, generator=generator)
    names = ("brightness", "contrast", "saturation", "hue", "gamma")
    factors = torch.zeros(1, 5, dtype=torch.float64)
    for op in order.tolist():
        factors[0, op] = _uniform(*getattr(ranges, names[op]), generator)
    angle = _uniform(-ranges.degrees, ranges.degrees, generator)
    dx = float(round(_uniform(-ranges.translate * padded_w, ranges.translate * padded_w, generator)))
    dy = float(round(_uniform(-ranges.translate * padded_h, ranges.translate * padded_h, generator)))
    scale = _uniform(*ranges.scale, generator)
    sigma = _uniform(*ranges.blur_sigma, generator)
    flip = torch.rand((), generator=generator).item() < ranges.hflip_prob
    noise = noise_std * torch.randn(x.shape, generator=generator)
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    params = ViewParams(order.view(1, 5), factors, one(angle), torch.tensor([[dx, dy]], dtype=torch.float64),
                        one(scale), one(sigma), torch.tensor([flip]))
    return params, noise.unsqueeze(0)


# ---- batched augmentation -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (2, 3, 17, 15), (2, 1, 3, 3)])
@pytest.mark.parametrize("soft", [False, True])
def test_views_equal_cotta_augment_for_the_same_random_draws(shape, soft):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    for seed in range(8):
        expected = cotta_augment(x, soft=soft, generator=torch.Generator().manual_seed(seed))
        params, noise = params_like_cotta_augment(x, torch.Generator().manual_seed(seed), soft=soft)
        got = apply_view_params(x, params, soft=soft, noise=noise)
        assert got.shape == (1, *x.shape)
        torch.testing.assert_close(got[0], expected, atol=2e-5, rtol=0)


def test_several_views_equal_each_view_applied_alone():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    params = draw_view_params(6, (32, 32), STRONG, torch.Generator().manual_seed(3))
    together = apply_view_params(x, params)
    for i in range(len(params)):
        torch.testing.assert_close(together[i], apply_view_params(x, params.view(i))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (1, 3, 64, 64)])
def test_views_shapes_range_and_determinism(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a = cotta_augment_views(x, 5, generator=torch.Generator().manual_seed(1))
    b = cotta_augment_views(x, 5, generator=torch.Generator().manual_seed(1))
    c = cotta_augment_views(x, 5, generator=torch.Generator().manual_seed(2))
    assert a.shape == (5, *shape) and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(not torch.equal(a[i], x) for i in range(5))
    assert all(not torch.equal(a[i], a[j]) for i in range(5) for j in range(i))


def test_one_parameter_set_per_view_shared_by_the_batch():
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    x = image.expand(4, -1, -1, -1).contiguous()  # the same image 4 times
    views = cotta_augment_views(x, 6, noise_std=0.0, generator=torch.Generator().manual_seed(1))
    for v in range(6):  # same parameters within a view: identical outputs (no noise)
        for b in range(1, 4):
            torch.testing.assert_close(views[v, b], views[v, 0])
    assert not torch.allclose(views[0, 0], views[1, 0])  # different views: different parameters
    noisy = cotta_augment_views(x, 2, noise_std=0.01, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(noisy[0, 0], noisy[0, 1])  # the noise is per pixel


def test_view_parameters_have_the_distribution_of_cotta_augment():
    params = draw_view_params(4000, (28, 28), STRONG, torch.Generator().manual_seed(0))
    for i, (low, high) in enumerate([STRONG.brightness, STRONG.contrast, STRONG.saturation, STRONG.hue, STRONG.gamma]):
        f = params.factors[:, i]
        assert low <= f.min() and f.max() <= high and abs(f.mean() - (low + high) / 2) < 0.02 * (high - low) + 1e-3
    # uniform random order: every op at every position about 1/5 of the time
    freq = torch.stack([(params.order == op).float().mean(0) for op in range(5)])
    assert (freq - 0.2).abs().max() < 0.03
    assert params.angle.abs().max() <= STRONG.degrees and abs(params.angle.mean()) < 0.5
    assert set(params.translate.flatten().tolist()) <= {float(v) for v in range(-4, 5)}
    assert abs(params.flip.float().mean() - 0.5) < 0.03
    # same mean change of the image as the loop of cotta_augment calls
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batched = (cotta_augment_views(x, 200) - x).abs().mean()
    looped = torch.stack([(cotta_augment(x) - x).abs().mean() for _ in range(200)]).mean()
    assert abs(batched - looped) < 0.02


def test_views_reject_bad_inputs():
    with pytest.raises(ValueError, match="cotta_augment"):
        cotta_augment_views(torch.rand(3, 32, 32), 2)
    with pytest.raises(ValueError, match="num_views"):
        cotta_augment_views(torch.rand(1, 3, 8, 8), 0)


# ---- batched teacher --------------------------------------------------------------------------
def test_batched_teacher_forward_equals_the_loop_for_the_same_views():
    method = build_method("cotta", SmallBNNet())
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    views = cotta_augment_views(x, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = method.views_forward(method.teacher, views)
        looped = torch.stack([method.teacher(v) for v in views])
        concatenated = method.teacher(views.flatten(0, 1)).view_as(looped)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(concatenated, looped, atol=1e-3)  # one BN batch over all views would differ



def test_batched_teacher_prediction_equals_the_looped_one(monkeypatch):
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    views = cotta_augment_views(x, 5, generator=torch.Generator().manual_seed(1))
    predictions = {}
    for batched in (True, False):
        method = build_method("cotta", SmallBNNet(), {"aug_threshold": 1.01, "num_augmentations": 5,
                                                     "batched_views": batched})
        queue = list(views)
        monkeypatch.setattr(method.augment, "forward", lambda inp, generator=None: queue.pop(0))
        monkeypatch.setattr(method.augment, "views", lambda inp, n, generator=None: views[:n])
        predictions[batched] = method.teacher_prediction(x)
    torch.testing.assert_close(predictions[True], predictions[False], atol=1e-5, rtol=1e-5)


def test_views_only_when_the_anchor_is_unsure(monkeypatch):
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    for threshold, expected in ((0.0, 0), (1.01, 1)):
        method = build_method("cotta", SmallBNNet(), {"aug_threshold": threshold})
        monkeypatch.setattr(method.augment, "views", lambda inp, n, generator=None: calls.append(n) or
                            cotta_augment_views(inp, n))
        calls.clear()
        method(x)
        assert len(calls) == expected
    assert calls == [32]


def _trained_model_and_shifted_stream(n_batches=6, batch_size=32):
    """A SmallBNNet trained briefly on 10 smooth noisy prototypes (that survive the augmentation); the test stream halves the contrast
    (x / 2 + 1/2), under which the source's running statistics are wrong (about 80% error)."""
    g = torch.Generator().manual_seed(5)
    prototypes = nn.functional.interpolate(torch.rand(NUM_CLASSES, 3, 4, 4, generator=g), size=16, mode="bilinear")

    def sample(n):
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return 0.5 * prototypes[y] + 0.5 * torch.rand(n, 3, 16, 16, generator=g), y

    model = SmallBNNet().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        x, y = sample(32)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, [(x * 0.5 + 0.5, y) for x, y in (sample(batch_size) for _ in range(n_batches))]


def test_batched_cotta_still_reduces_the_error_like_the_loop():
    model, stream = _trained_model_and_shifted_stream()

    def error(method):
        torch.manual_seed(0)
        wrong = sum((method(x).argmax(1) != y).sum().item() for x, y in stream)
        return 100.0 * wrong / sum(len(y) for _, y in stream)

    source = error(build_method("source", copy.deepcopy(model)))
    cfg = {"aug_threshold": 1.01, "num_augmentations": 8}  # augment every batch
    batched = error(build_method("cotta", copy.deepcopy(model), {**cfg, "batched_views": True}))
    looped = error(build_method("cotta", copy.deepcopy(model), {**cfg, "batched_views": False}))
    assert source > 50
    assert batched < source - 30 and looped < source - 30
    assert abs(batched - looped) < 10


def test_single_view_is_the_first_of_batched_views():
    x = torch.rand(4, 1, 28, 28)
    augment = CoTTAAugment()
    one = augment.single_view(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(one, augment.views(x, 1, torch.Generator().manual_seed(3))[0])
    assert one.shape == x.shape and 0.0 <= one.min() and one.max() <= 1.0
