"""Test streams: every setting, any batch size, determinism, laziness, and the validation errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from metatta.data.streams import GRADUAL_SEVERITIES, OPTIONS, SETTINGS, Stream, build_stream, check_images
from metatta.data.types import Batch, DomainData

CORRUPTIONS = ("fog", "snow", "frost")


def make_domains(sizes=(12, 12), severities=(5,), classes=4, seed=0, corruptions=CORRUPTIONS):
    """Domains whose images carry their identity: pixels (0, 0) and (0, 2) = row, pixel (0, 1) = domain index."""
    rng = np.random.default_rng(seed)
    out = []
    for c, n in zip(corruptions, sizes):
        for s in severities:
            images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
            images[:, 0, 0, 0] = np.arange(n) % 256
            images[:, 0, 2, 0] = np.arange(n) // 256
            images[:, 0, 1, 0] = len(out)
            out.append(DomainData(c, s, images, rng.integers(0, classes, n).astype(np.int64)))
    return out


def ids(batch):
    """(domain index, row) of each image in a batch."""
    pixels = (batch.x[:, 0, 0, :3] * 255).round().long()
    return [(int(d), int(low) + 256 * int(high)) for low, d, high in pixels.tolist()]


def label_entropy(stream, classes):
    hs = []
    for b in stream:
        p = np.bincount(b.y.numpy(), minlength=classes) / len(b.y)
        hs.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(hs))


# ---- properties over settings, sizes and seeds ------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(batch_size=st.integers(1, 40), seed=st.integers(0, 2**31), sizes=st.lists(st.integers(1, 30), min_size=1,
       max_size=3), setting=st.sampled_from(["episodic", "continual", "mixed", "label_shift"]))
def test_every_image_exactly_once_with_its_label(batch_size, seed, sizes, setting):
    domains = make_domains(sizes=sizes)
    stream = build_stream(domains, setting, batch_size, seed=seed)
    batches = list(stream)
    assert len(batches) == len(stream) and stream.num_images == sum(sizes)
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == [(d, r) for d, n in enumerate(sizes) for r in range(n)]
    for b in batches:
        assert isinstance(b, Batch) and 1 <= len(b.y) <= batch_size and b.x.shape[0] == len(b.y)
        assert b.y.tolist() == [int(domains[d].labels[r]) for d, r in ids(b)]
        if setting != "mixed":
            assert {domains[d].name for d, _ in ids(b)} == {b.domain}
    # only the last batch of each segment may be short
    by_segment = {}
    for b in batches:
        by_segment.setdefault(b.domain, []).append(len(b.y))
    for lengths in by_segment.values():
        assert all(n == batch_size for n in lengths[:-1])
    expected = ["mixed"] if setting == "mixed" else [d.name for d in domains]
    assert stream.domain_names == expected and list(by_segment) == expected


@settings(max_examples=15, deadline=None)
@given(batch_size=st.integers(1, 20), seed=st.integers(0, 1000),
       setting=st.sampled_from(["episodic", "continual", "gradual", "mixed", "label_shift"]))
def test_deterministic_and_reiterable(batch_size, seed, setting):
    domains = make_domains(sizes=(9, 9), severities=(1, 2, 3, 4, 5))
    first = [(b.domain, ids(b), b.y.tolist()) for b in build_stream(domains, setting, batch_size, seed=seed)]
    stream = build_stream(domains, setting, batch_size, seed=seed)
    assert [(b.domain, ids(b), b.y.tolist()) for b in stream] == first
    assert [(b.domain, ids(b), b.y.tolist()) for b in stream] == first  # iterating again: same batches


def test_seed_changes_the_order_and_shuffle_false_keeps_it():
    domains = make_domains(sizes=(30, 30))
    order = lambda s: [ids(b) for b in s]  # noqa: E731
    assert order(build_stream(domains, "continual", 7, seed=1)) != order(build_stream(domains, "continual", 7, seed=2))
    plain = order(build_stream(domains, "continual", 7, shuffle=False))
    assert [i for b in plain for i in b] == [(d, r) for d in range(2) for r in range(30)]


def test_a_domain_order_does_not_depend_on_its_neighbours():
    fog, snow, frost = make_domains(sizes=(20, 20, 20))
    alone = [r for b in build_stream([fog], "episodic", 6, seed=3) for _, r in ids(b)]
    with_others = [r for b in build_stream([snow, fog, frost], "episodic", 6, seed=3) if b.domain == "fog-5"
                   for _, r in ids(b)]
    assert alone == with_others


# ---- batch format and laziness ----------------------------------------------------------------------
def test_batch_format():
    domains = make_domains()
    b = next(iter(build_stream(domains, "episodic", 5, shuffle=False)))
    assert b.x.dtype == torch.float32 and b.x.shape == (5, 1, 4, 4) and b.x.is_contiguous()
    assert b.y.dtype == torch.int64 and b.domain == "fog-5"
    expected = torch.from_numpy(domains[0].images[:5]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(b.x, expected) and 0 <= b.x.min() and b.x.max() <= 1


class CountingImages:
    """An array-like that records which rows are read, as a memory map would serve them."""

    def __init__(self, images):
        self.images, self.reads = images, []
        self.dtype, self.ndim, self.shape = images.dtype, images.ndim, images.shape

    def __len__(self):
        return len(self.images)

    def __getitem__(self, rows):
        self.reads.append(np.asarray(rows))
        return self.images[rows]


def test_images_are_read_lazily_per_batch_in_ascending_order():
    (d,) = make_domains(sizes=(25,), corruptions=("fog",))
    lazy = CountingImages(d.images)
    stream = build_stream([DomainData("fog", 5, lazy, d.labels)], "continual", 10, seed=0)
    assert len(stream) == 3 and lazy.reads == []  # building reads nothing
    batches = iter(stream)
    first = next(batches)
    assert len(lazy.reads) == 1 and len(lazy.reads[0]) == 10
    assert np.all(np.diff(lazy.reads[0]) > 0)  # sorted rows: sequential reads of a memory map
    assert [r for _, r in ids(first)] != sorted(r for _, r in ids(first))  # but the batch keeps stream order
    rest = list(batches)
    assert [len(r) for r in lazy.reads] == [10, 10, 5] and sum(len(b.y) for b in rest) == 15


def test_memmap_domains(tmp_path):
    (d,) = make_domains(sizes=(11,), corruptions=("fog",))
    np.save(tmp_path / "fog.npy", d.images)
    mapped = np.load(tmp_path / "fog.npy", mmap_mode="r")
    stream = build_stream([DomainData("fog", 5, mapped, d.labels)], "mixed", 4, seed=0)
    assert sorted(r for b in stream for _, r in ids(b)) == list(range(11))


# ---- settings ---------------------------------------------------------------------------------------
def test_resets_per_domain_only_for_episodic():
    domains = make_domains(severities=(1, 2, 3, 4, 5))
    for setting in SETTINGS:
        stream = build_stream(domains, setting, 4)
        assert isinstance(stream, Stream) and stream.setting == setting and stream.batch_size == 4
        assert stream.resets_per_domain == (setting == "episodic")


def test_gradual_follows_cotta_code_by_default():
    domains = make_domains(sizes=(3, 3), severities=(3, 1, 5, 2, 4))  # given in any order
    stream = build_stream(domains, "gradual", 3)
    expected = [f"fog-{s}" for s in (5, 4, 3, 2, 1)] + [f"snow-{s}" for s in GRADUAL_SEVERITIES]
    assert [b.domain for b in stream] == expected == stream.domain_names
    assert stream.num_images == 3 * len(expected)  # images recur, once per visit
    paper = build_stream(domains, "gradual", 3, start_high=False)
    assert paper.domain_names == [f"{c}-{s}" for c in ("fog", "snow") for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    visits = [ids(b) for b in paper if b.domain == "fog-4"]
    assert len(visits) == 2 and sorted(visits[0]) == sorted(visits[1]) and visits[0] != visits[1]


def test_gradual_errors():
    with pytest.raises(ValueError, match="severities 1-5 .*missing \\['fog-1'"):
        build_stream(make_domains(severities=(2, 3, 4, 5)), "gradual", 3)
    domains = make_domains(sizes=(3,), severities=(1, 2, 3, 4, 5), corruptions=("fog",))
    with pytest.raises(ValueError, match="fog-3 is given twice"):
        build_stream(domains + [domains[2]], "gradual", 3)


def test_mixed_interleaves_domains():
    domains = make_domains(sizes=(50, 50, 50))
    stream = build_stream(domains, "mixed", 30, seed=0)
    batches = list(stream)
    assert {b.domain for b in batches} == {"mixed"} and stream.domain_names == ["mixed"]
    assert all(len({d for d, _ in ids(b)}) == 3 for b in batches)  # each batch draws from every domain
    odd = DomainData("fog", 1, np.zeros((3, 5, 5, 1), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="same image shape"):
        build_stream(domains + [odd], "mixed", 4)


def test_label_shift_is_a_permutation_with_low_label_entropy():
    (d,) = make_domains(sizes=(400,), classes=10, corruptions=("fog",))
    iid = label_entropy(build_stream([d], "continual", 20, seed=0), 10)
    shifted = build_stream([d], "label_shift", 20, seed=0)  # dirichlet_alpha defaults to 0.1
    assert shifted.options["dirichlet_alpha"] == 0.1
    rows = [r for b in shifted for _, r in ids(b)]
    assert sorted(rows) == list(range(400))
    assert label_entropy(shifted, 10) < 0.6 * iid
    loose = np.mean([label_entropy(build_stream([d], "label_shift", 20, seed=s, dirichlet_alpha=1000.0), 10)
                     for s in range(3)])
    tight = np.mean([label_entropy(build_stream([d], "label_shift", 20, seed=s, dirichlet_alpha=0.01), 10)
                     for s in range(3)])
    # Smaller alpha, fewer classes per batch. Even a large alpha is not i.i.d.: within a slot each
    # class's chunk stays contiguous (as in RoTTA's sampler), so batches still span chunks.
    assert tight < 0.5 * loose and 0.7 * iid < loose < iid


def test_label_shift_per_domain_and_slots():
    domains = make_domains(sizes=(60, 40), classes=5)
    stream = build_stream(domains, "label_shift", 8, seed=2, num_slots=3)
    assert stream.domain_names == ["fog-5", "snow-5"] and not stream.resets_per_domain
    assert sorted(i for b in stream for i in ids(b)) == [(d, r) for d, n in enumerate((60, 40)) for r in range(n)]


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(1e-3, 1e3), seed=st.integers(0, 10**6), n=st.integers(1, 60), classes=st.integers(1, 12),
       num_slots=st.one_of(st.none(), st.integers(1, 20)))
def test_label_shift_permutation_property(alpha, seed, n, classes, num_slots):
    (d,) = make_domains(sizes=(n,), classes=classes, corruptions=("fog",), seed=seed % 7)
    stream = build_stream([d], "label_shift", 7, seed=seed, dirichlet_alpha=alpha, num_slots=num_slots)
    assert sorted(r for b in stream for _, r in ids(b)) == list(range(n))


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"setting": "nope", "batch_size": 2}, "unknown stream setting 'nope'; known: episodic, continual, gradual, "
                                           "mixed, label_shift"),
    ({"setting": "continual", "batch_size": 0}, "batch_size"),
    ({"setting": "continual", "batch_size": -3}, "batch_size"),
    ({"setting": "continual", "batch_size": 2.5}, "batch_size"),
    ({"setting": "continual", "batch_size": True}, "batch_size"),
    ({"setting": "continual", "batch_size": 2, "seed": -1}, "seed"),
    ({"setting": "label_shift", "batch_size": 2, "dirichlet_alpha": 0}, "dirichlet_alpha"),
    ({"setting": "label_shift", "batch_size": 2, "dirichlet_alpha": float("nan")}, "dirichlet_alpha"),
    ({"setting": "label_shift", "batch_size": 2, "num_slots": 0}, "num_slots"),
    ({"setting": "continual", "batch_size": 2, "dirichlet_alpha": 0.1}, "do not apply to setting 'continual'"),
    ({"setting": "mixed", "batch_size": 2, "shuffle": False}, "do not apply to setting 'mixed'.*none"),
    ({"setting": "episodic", "batch_size": 2, "slot_size": 3}, "slot_size"),
])
def test_stream_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_stream(make_domains(), **kwargs)
    assert set(OPTIONS) == set(SETTINGS)


def test_bad_domains():
    d = make_domains()[0]
    cases = [
        ([DomainData("fog", 5, d.images, d.labels[:-1])], "fog-5: 11 labels for 12 images"),
        ([DomainData("fog", 5, d.images.astype(np.float32), d.labels)], "fog-5: images must be uint8"),
        ([DomainData("fog", 5, d.images[..., 0], d.labels)], "fog-5: images must be uint8 \\(N, H, W, C\\)"),
        ([DomainData("fog", 5, np.repeat(d.images, 2, axis=3), d.labels)], "C in 1 or 3"),
        ([DomainData("fog", 5, d.images, d.labels.astype(float))], "fog-5: labels must be a 1-D integer"),
        ([DomainData("fog", 5, d.images[:0], d.labels[:0])], "fog-5: the domain has no images"),
        ([], "no domains"),
        ([(d.images, d.labels)], "expected DomainData"),
    ]
    for domains, match in cases:
        with pytest.raises(ValueError, match=match):
            build_stream(domains, "continual", 2)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 1, 4, 4), np.float32), "x: expected a torch.Tensor"),
    (torch.zeros(2, 1, 4), "x: expected shape"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "x: expected a floating-point dtype"),
    (torch.zeros(2, 2, 4, 4), "x: expected 1 or 3 channels"),
    (torch.full((1, 1, 2, 2), float("nan")), "x: contains NaN"),
    (torch.full((1, 3, 2, 2), float("inf")), "infinite"),
])
def test_check_images(bad, match):
    with pytest.raises(ValueError, match=match):
        check_images(bad)
    good = torch.rand(2, 3, 4, 4)
    assert check_images(good) is good
    with pytest.raises(ValueError, match="^batch.x: "):
        check_images(torch.zeros(2, 1, 4), name="batch.x")
