import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from metatta.data.streams import SETTINGS, build_stream, check_images
from metatta.data.types import DomainData


def make_domains(n=12, corruptions=("fog", "snow"), severities=(5,), seed=0, classes=4):
    rng = np.random.default_rng(seed)
    out = []
    for c in corruptions:
        for s in severities:
            images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
            images[:, 0, 0, 0] = np.arange(n)  # identify each image by its first pixel
            out.append(DomainData(c, s, images, rng.integers(0, classes, n).astype(np.int64)))
    return out


def ids(batch):
    return (batch.x[:, 0, 0, 0] * 255).round().long().tolist()


@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 30), seed=st.integers(0, 5), setting=st.sampled_from(["episodic", "continual", "mixed", "label_shift"]))
def test_every_image_exactly_once(batch_size, seed, setting):
    domains = make_domains()
    stream = build_stream(domains, setting, batch_size, seed=seed)
    batches = list(stream)
    assert len(batches) == len(stream)
    assert all(1 <= len(b.y) <= batch_size for b in batches)
    assert stream.num_images == sum(len(b.y) for b in batches) == 24
    if setting != "mixed":
        seen = {}
        for b in batches:
            seen.setdefault(b.domain, []).extend(ids(b))
        assert {k: sorted(v) for k, v in seen.items()} == {"fog-5": list(range(12)), "snow-5": list(range(12))}
    else:
        # mixed batches interleave domains; labels and images stay paired
        assert sorted(sum((ids(b) for b in batches), [])) == sorted(list(range(12)) * 2)


def test_labels_stay_with_their_images():
    domains = make_domains(n=20)
    for setting in ("episodic", "mixed", "label_shift"):
        for b in build_stream(domains, setting, 7, seed=3):
            for i, y in zip(ids(b), b.y.tolist()):
                assert y in {int(d.labels[i]) for d in domains}
    d = domains[0]
    for b in build_stream([d], "continual", 5, seed=1):
        assert b.y.tolist() == [int(d.labels[i]) for i in ids(b)]


def test_deterministic_and_seed_dependent():
    domains = make_domains()
    first = [ids(b) for b in build_stream(domains, "continual", 5, seed=1)]
    again = [ids(b) for b in build_stream(domains, "continual", 5, seed=1)]
    other = [ids(b) for b in build_stream(domains, "continual", 5, seed=2)]
    assert first == again and first != other


def test_episodic_resets_and_format():
    stream = build_stream(make_domains(), "episodic", 4)
    assert stream.resets_per_domain and not build_stream(make_domains(), "continual", 4).resets_per_domain
    b = next(iter(stream))
    assert b.x.dtype == torch.float32 and b.x.shape == (4, 1, 4, 4) and 0 <= b.x.min() and b.x.max() <= 1
    assert b.y.dtype == torch.int64 and stream.domain_names == ["fog-5", "snow-5"]


def test_gradual_severity_order():
    domains = make_domains(n=3, severities=(1, 2, 3, 4, 5))
    stream = build_stream(domains, "gradual", 3)
    order = [b.domain for b in stream]
    assert order == [f"{c}-{s}" for c in ("fog", "snow") for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    with pytest.raises(ValueError, match="severities 1-5"):
        build_stream(make_domains(severities=(5,)), "gradual", 3)


def test_label_shift_lowers_label_entropy():
    domains = make_domains(n=400, corruptions=("fog",), classes=10)

    def mean_batch_entropy(stream):
        hs = []
        for b in stream:
            p = np.bincount(b.y.numpy(), minlength=10) / len(b.y)
            hs.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return np.mean(hs)

    iid = mean_batch_entropy(build_stream(domains, "continual", 20, seed=0))
    shifted = mean_batch_entropy(build_stream(domains, "label_shift", 20, seed=0, dirichlet_alpha=0.05))
    assert shifted < 0.7 * iid


@pytest.mark.parametrize("kwargs, match", [
    ({"setting": "nope", "batch_size": 2}, "unknown stream setting"),
    ({"setting": "continual", "batch_size": 0}, "batch_size"),
    ({"setting": "label_shift", "batch_size": 2, "dirichlet_alpha": 0}, "dirichlet_alpha"),
])
def test_stream_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_stream(make_domains(), **kwargs)


def test_bad_domains_and_images():
    d = make_domains()[0]
    with pytest.raises(ValueError, match="labels"):
        build_stream([DomainData("fog", 5, d.images, d.labels[:-1])], "continual", 2)
    with pytest.raises(ValueError, match="uint8"):
        build_stream([DomainData("fog", 5, d.images.astype(np.float32), d.labels)], "continual", 2)
    with pytest.raises(ValueError, match="no domains"):
        build_stream([], "continual", 2)
    for bad, match in [(torch.zeros(2, 1, 4), "shape"), (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "dtype"),
                       (torch.zeros(2, 2, 4, 4), "channels"), (torch.full((1, 1, 2, 2), float("nan")), "NaN")]:
        with pytest.raises(ValueError, match=match):
            check_images(bad)
    assert set(SETTINGS) == {"episodic", "continual", "gradual", "mixed", "label_shift"}
