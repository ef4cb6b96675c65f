"""benchmarks/cta_sweep.py: the encoder diagnostics and the variant parsing (the sweep itself is a benchmark)."""
import numpy as np
import pytest
import torch

from metatta.models import build_model
from metatta.ssl import build_network, split_classifier
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


def test_encoder_diagnostics_of_an_encoder_against_itself_and_a_scaled_copy(sweep):
    torch.manual_seed(0)
    source = build_model("resnet_fmnist", 10, 1, widths=[4, 8, 8])
    net = build_network(source, {"projector": [8, 4]})
    supervised = split_classifier(source)[0]
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 40)
    same = sweep.encoder_diagnostics(net, supervised, images, labels)
    assert same["cosine"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(1.0)
    assert same["ssl_error"] == same["sup_error"] and same["ssl_confidence"] == pytest.approx(same["sup_confidence"])
    net.encoder = torch.nn.Sequential(net.encoder, _Scale(2.0))  # same directions, twice the norm
    twice = sweep.encoder_diagnostics(net, supervised, images, labels)
    assert twice["cosine"] == pytest.approx(1.0) and twice["norm_ratio"] == pytest.approx(2.0)
    assert twice["ssl_confidence"] != pytest.approx(same["ssl_confidence"])
    halved = sweep.encoder_diagnostics(net, supervised, images, labels, scale=0.5)  # the rescaling undoes it
    assert halved["norm_ratio"] == pytest.approx(1.0) and halved["ssl_error"] == same["ssl_error"]


class _Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor
