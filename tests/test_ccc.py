"""The CCC-style stream (stream setting ccc): reproducible bit for bit, seeded, holding the source
accuracy near the target, lazy in its length, and strict about its options.

A tiny nearest-template classifier on 12x12 images stands in for the source model: noise
corruptions move its accuracy smoothly from ~100 % to ~30 %, and calibrating it takes a second."""
import numpy as np
import pytest
import torch
from torch import nn

from metatta.data import ccc
from metatta.data.streams import build_stream
from metatta.data.types import Batch, DomainData
from metatta.evaluation import evaluate
from metatta.methods import build_method

NOISES = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"]
TARGET, TOLERANCE = 60.0, 8.0


class Templates(nn.Module):
    """Logits = minus the squared distance to each class's template."""

    def __init__(self, templates: torch.Tensor):
        super().__init__()
        self.register_buffer("templates", templates)

    def forward(self, x):
        return -((x.flatten(1)[:, None, :] - self.templates.flatten(1)[None]) ** 2).sum(-1)


def tiny_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    templates = np.clip(0.5 + rng.normal(0, 0.012, (10, 1, 12, 12)), 0, 1).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int64)
    images = np.clip(templates[labels] + rng.normal(0, 0.004, (n, 1, 12, 12)), 0, 1)
    images = (images * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return ccc.clean_domain(images, labels), Templates(torch.from_numpy(templates))


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """One calibration cache for the module: the first stream calibrates, the others reuse it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METATTA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def data():
    return tiny_data()


def make(data, seed=0, batch_size=50, **options):
    clean, model = data
    options = {"target_accuracy": TARGET, "tolerance": TOLERANCE, "corruptions": NOISES, "num_images": 4000,
               "transition_images": 1000, "calibration_images": 200, **options}
    return build_stream([clean], "ccc", batch_size, seed=seed, model=model, **options)


def same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.domain == b.domain


def test_same_seed_same_images_bit_for_bit_and_any_batch_directly(data):
    first = make(data, seed=3)
    batches = list(first)
    assert len(batches) == len(first) == 80
    again = make(data, seed=3)  # a new stream, calibration from the cache
    assert again.calibration.seconds == 0
    assert all(same(a, b) for a, b in zip(batches, again))
    fresh = make(data, seed=3)  # jump straight into the stream (resume): the same images
    for i in (57, 19, 79, 0):
        assert same(fresh.batch(i), batches[i])
    for b in batches:
        assert b.x.dtype == torch.float32 and b.x.shape[1:] == (1, 12, 12) and 0 <= b.x.min() <= b.x.max() <= 1
        assert b.domain == "ccc-medium"


def test_different_seeds_differ(data):
    a, b = make(data, seed=0), make(data, seed=1)
    assert not torch.equal(a.batch(0).x, b.batch(0).x)
    assert [a.walk[k] for k in range(6)] != [b.walk[k] for k in range(6)]


def test_the_corruption_changes_with_every_image(data):
    stream = make(data)
    a, b, t = stream.state_at(250)
    assert a != b and a[0] != b[0] and t == 0.25
    assert stream.state_at(1000)[0] == b  # the next transition starts where this one ends
    walk = [stream.walk[k] for k in range(20)]
    assert all(x[0] != y[0] for x, y in zip(walk, walk[1:]))  # consecutive nodes: other corruptions
    assert {c for c, _ in walk} <= set(NOISES) and len({c for c, _ in walk}) >= 2


def test_walk_holds_source_accuracy_near_target(data):
    stream = make(data, num_images=8000)
    _, model = data
    correct = []
    with torch.no_grad():
        for batch in stream:
            correct.append((model(batch.x).argmax(1) == batch.y).numpy())
    windows = np.concatenate(correct).reshape(-1, 1000).mean(1) * 100
    assert abs(windows.mean() - TARGET) <= TOLERANCE, windows
    assert np.all(np.abs(windows - TARGET) <= TOLERANCE + 10), windows
    for node in stream.walk.band:  # every node the walk may visit was calibrated in band
        assert abs(stream.calibration.node(node) - TARGET) <= TOLERANCE


def test_any_length_lazily(data):
    n = 10**9 + 7  # 10,000 transitions: the walk to the last one is replayed (table look-ups only)
    stream = make(data, num_images=n, batch_size=64, transition_images=100_000)
    assert len(stream) == -(-n // 64) and stream.num_images == n
    last = stream.batch(len(stream) - 1)
    assert len(last.y) == n % 64
    stream.batch(123_456)
    assert len(stream._live) <= ccc.MAX_LIVE_NODES  # memory: a few nodes' copies of the clean set
    with pytest.raises(IndexError):
        stream.batch(len(stream))
    labels = data[0].labels
    assert sorted(stream.clean_rows(np.arange(400, 800))) == list(range(len(labels)))  # each pass: a permutation


def test_calibration_is_cached_per_model(data):
    make(data)
    clean, model = data
    other = Templates(model.templates + 0.001)
    stream = build_stream([clean], "ccc", 50, model=other, target_accuracy=TARGET, tolerance=TOLERANCE,
                          corruptions=NOISES, calibration_images=200, num_images=100)
    assert stream.calibration.seconds > 0 and stream.calibration.key != make(data).calibration.key


@pytest.mark.parametrize("options, message", [
    ({"difficulty": "extreme"}, "difficulty must be one of"),
    ({"tolerance": -1}, "tolerance must be a number"),
    ({"target_accuracy": 101}, "target_accuracy must be a number"),
    ({"num_images": 0}, "num_images must be an integer >= 1"),
    ({"num_images": 2.5}, "num_images must be an integer"),
    ({"transition_images": 0}, "transition_images must be an integer >= 1"),
    ({"calibration_images": 0}, "calibration_images must be an integer >= 1"),
    ({"corruptions": ["gaussian_noise", "nope"]}, "unknown: \\['nope'\\]"),
    ({"corruptions": ["fog"]}, "at least two distinct"),
    ({"corruptions": "everything"}, "corruptions must be one of"),
    ({"cache": "yes"}, "cache must be true or false"),
    ({"speed": 3}, "do not apply to setting 'ccc'"),
    ({"target_accuracy": 99.0, "tolerance": 0.0}, "fewer than two corruptions"),
])
def test_bad_options_are_refused_by_name(data, options, message):
    with pytest.raises(ValueError, match=message):
        make(data, **options)


def test_needs_a_model_and_one_clean_domain(data):
    clean, model = data
    with pytest.raises(ValueError, match="option model= must be the source model"):
        build_stream([clean], "ccc", 8)
    with pytest.raises(ValueError, match="exactly one domain"):
        build_stream([clean, clean], "ccc", 8, model=model)
    with pytest.raises(ValueError, match="batch_size"):
        build_stream([clean], "ccc", 0, model=model)
    small = DomainData("clean", 0, np.zeros((4, 6, 6, 1), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="at least 8x8"):
        build_stream([small], "ccc", 8, model=model)


def test_the_evaluator_runs_a_method_over_it(data):
    stream = make(data, num_images=500)
    result = evaluate(build_method("source", data[1]), stream, progress=False)
    assert result.num_images == 500 and list(result.domain_errors) == ["ccc-medium"]
    assert result.protocol["setting"] == "ccc" and len(result.error_over_stream) == len(stream)


def test_the_walk_does_not_depend_on_what_else_is_cached(data, tmp_path, monkeypatch):
    monkeypatch.setenv("METATTA_CACHE", str(tmp_path / "fresh"))
    alone = [make(data, seed=5).walk[k] for k in range(8)]
    make(data, target_accuracy=90.0, tolerance=12.0)  # another target refines more nodes into the cache
    assert [make(data, seed=5).walk[k] for k in range(8)] == alone
