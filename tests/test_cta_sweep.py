"""metatta.ssl.diagnostics (the encoder diagnostics) and benchmarks/cta_sweep.py's variant parsing (the sweep
itself is a benchmark)."""
import copy

import numpy as np
import pytest
import torch

from metatta.methods.common import use_batch_statistics
from metatta.models import build_model
from metatta.ssl import build_network, split_classifier
from metatta.ssl.diagnostics import encoder_diagnostics
from repo_scripts import load_script


@pytest.fixture(scope="module")
def sweep():
    return load_script("benchmarks/cta_sweep.py")


def test_variants_are_named_and_unique(sweep):
    assert sweep.parse_variants([]) == [("paper", [])]
    assert sweep.parse_variants([["fm1", "align.feature_weight=1"], ["t"]]) == [("fm1", ["align.feature_weight=1"]),
                                                                                ("t", [])]
    with pytest.raises(SystemExit, match="must differ"):
        sweep.parse_variants([["a"], ["a", "x=1"]])


def _tiny_encoders_and_images(seed: int):
    """A CTA network built from a tiny source model (so its encoder equals the supervised one), and
    40 random images with labels."""
    torch.manual_seed(0)
    source = build_model("resnet_fmnist", 10, 1, widths=[4, 8, 8])
    net = build_network(source, {"projector": [8, 4]})
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 40)
    return net, split_classifier(source)[0], images, labels


def test_encoder_diagnostics_of_an_encoder_against_itself_and_a_scaled_copy():
    net, supervised, images, labels = _tiny_encoders_and_images(seed=0)
    same = encoder_diagnostics(net, supervised, images, labels)
    assert same["cosine"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(1.0)
    assert same["ssl_error"] == same["sup_error"] and same["ssl_confidence"] == pytest.approx(same["sup_confidence"])
    net.encoder = torch.nn.Sequential(net.encoder, _Scale(2.0))  # same directions, twice the norm
    twice = encoder_diagnostics(net, supervised, images, labels)
    assert twice["cosine"] == pytest.approx(1.0) and twice["norm_ratio"] == pytest.approx(2.0)
    assert twice["ssl_confidence"] != pytest.approx(same["ssl_confidence"])
    halved = encoder_diagnostics(net, supervised, images, labels, scale=0.5)  # the rescaling undoes it
    assert halved["norm_ratio"] == pytest.approx(1.0) and halved["ssl_error"] == same["ssl_error"]


class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_encoder_diagnostics_with_source_statistics_use_each_encoders_running_buffers():
    net, supervised, images, labels = _tiny_encoders_and_images(seed=1)
    same = encoder_diagnostics(net, supervised, images, labels, statistics="source")
    assert same["cosine"] == pytest.approx(1.0) and same["ssl_error"] == same["sup_error"]
    batch = encoder_diagnostics(net, supervised, images, labels, statistics="batch")
    assert batch["norm_ratio"] == pytest.approx(1.0)
    # fresh running buffers (mean 0, var 1) are not these images' statistics: the features differ by mode
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    assert not torch.allclose(supervised.eval()(x), _batch_stats_features(supervised, x), atol=1e-3)
    # the SSL encoder's own buffers are used, not the supervised one's: shift them and only SSL changes
    for m in net.encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(0.5)
    shifted = encoder_diagnostics(net, supervised, images, labels, statistics="source")
    assert shifted["sup_error"] == same["sup_error"] and shifted["cosine"] < 0.999
    assert encoder_diagnostics(net, supervised, images, labels, statistics="batch")["cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="statistics"):
        encoder_diagnostics(net, supervised, images, labels, statistics="running")


def _batch_stats_features(encoder, x):
    enc = copy.deepcopy(encoder).eval()
    use_batch_statistics(enc)
    with torch.no_grad():
        return enc(x)
