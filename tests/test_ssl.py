"""metatta.ssl: NT-Xent, the alignment loss, SimCLR augmentations, rotations, the multi-head network."""
import math

import pytest
import torch
from torch import nn

from metatta.models import build_model
from metatta.ssl import (
    SimCLRAugment,
    alignment_loss,
    build_network,
    feature_agreement,
    feature_matching_loss,
    load_network,
    nt_xent,
    rotate_batch,
    save_network,
    simclr_augment,
    split_classifier,
)
from metatta.ssl.rotation import rotate, rotation_loss

E1, E2 = [1.0, 0.0], [0.0, 1.0]


# ---- NT-Xent --------------------------------------------------------------------------------
def test_nt_xent_matches_hand_computed_values():
    # Views equal: each anchor's positive has cosine 1, its two negatives cosine 0.
    same = torch.tensor([E1, E2])
    assert nt_xent(same, same.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e))
    assert nt_xent(same, same.clone(), temperature=0.5).item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)))
    # Views swapped: the positive has cosine 0, one negative cosine 1: -log(1 / (1 + 1 + e)).
    swapped = torch.tensor([E2, E1])
    assert nt_xent(same, swapped, temperature=1.0).item() == pytest.approx(math.log(2 + math.e))
    # Scale does not matter (cosine similarity).
    assert nt_xent(3 * same, 0.5 * swapped, 1.0).item() == pytest.approx(math.log(2 + math.e))


def test_nt_xent_refuses_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), temperature=0)


# ---- alignment ------------------------------------------------------------------------------
def test_alignment_loss_matches_hand_computed_values():
    f = torch.tensor([E1, E2])
    assert alignment_loss(f, f.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 1 / math.e))
    # Supervised features (1, 1) and (0, 1): cosine logits [[c, 0], [c, 1]], c = 1/sqrt(2).
    c = 1 / math.sqrt(2)
    ssl_to_sup = (-math.log(math.exp(c) / (math.exp(c) + 1)) - math.log(math.e / (math.exp(c) + math.e))) / 2
    sup_to_ssl = (math.log(2) - math.log(math.e / (1 + math.e))) / 2  # columns: [c, c] and [0, 1]
    expected = (ssl_to_sup + sup_to_ssl) / 2
    assert alignment_loss(f, torch.tensor([[1.0, 1.0], E2]), 1.0).item() == pytest.approx(expected)
    # Temperature divides the cosines.
    t = 0.1
    assert alignment_loss(f, f.clone(), t).item() == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-3)  # float32


def test_feature_agreement():
    f = torch.tensor([E1, E2])
    assert feature_agreement(f, 2 * f) == {"cosine": pytest.approx(1.0), "retrieval": 1.0, "norm_ratio": 0.5}
    assert feature_agreement(f, f.flip(0)) == {"cosine": pytest.approx(0.0), "retrieval": 0.0, "norm_ratio": 1.0}
    with pytest.raises(ValueError, match="one shape"):
        alignment_loss(torch.randn(3, 2), torch.randn(2, 2))


def test_feature_matching_loss_by_hand():
    f_sup = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # mean squared norm 12.5
    f_ssl = torch.tensor([[3.0, 4.0], [1.0, 2.0]])  # squared errors 0 and 5
    assert feature_matching_loss(f_ssl, f_sup).item() == pytest.approx(2.5 / 12.5)
    assert feature_matching_loss(3 * f_sup, 3 * f_sup).item() == 0.0
    # Scale-free: the same relative mismatch gives the same loss at any feature size.
    assert feature_matching_loss(10 * f_ssl, 10 * f_sup).item() == pytest.approx(0.2)
    # InfoNCE ignores the norm, this term does not.
    assert alignment_loss(2 * f_sup[:1], f_sup[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_matching_loss(2 * f_sup[:1], f_sup[:1]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        feature_matching_loss(torch.randn(3, 2), torch.randn(2, 2))


def _tiny_encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten())


def test_alignment_lowers_the_loss_and_raises_feature_agreement():
    ssl, supervised = _tiny_encoder(0), _tiny_encoder(1).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    x = nn.functional.interpolate(torch.rand(64, 1, 3, 3, generator=g), size=12, mode="bilinear")  # smooth images
    optimizer = torch.optim.Adam(ssl.parameters(), lr=1e-2)

    def measure():
        with torch.no_grad():
            f_ssl, f_sup = ssl(x), supervised(x)
        return alignment_loss(f_ssl, f_sup, 0.1).item(), feature_agreement(f_ssl, f_sup)

    loss_before, agreement_before = measure()
    for step in range(100):
        batch = x[(step * 16) % 64:][:16]
        loss = alignment_loss(ssl(batch), supervised(batch), 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, agreement_after = measure()
    assert loss_after < 0.7 * loss_before
    assert agreement_after["cosine"] > agreement_before["cosine"] + 0.05
    assert agreement_after["retrieval"] > agreement_before["retrieval"]


# ---- augmentations --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 1, 28, 28), (6, 3, 32, 32), (3, 3, 17, 23), (2, 1, 224, 224)])
def test_simclr_augment_shapes_range_and_per_image_parameters(shape):
    x = torch.rand(1, *shape[1:]).expand(shape).contiguous()  # identical images
    out = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[0], out[1]), "images of one batch must get their own parameters"
    again = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_simclr_augment_without_randomness_is_the_identity():
    x = torch.rand(4, 3, 16, 20)
    identity = SimCLRAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_prob=0, jitter_prob=0,
                             grayscale_prob=0)
    torch.testing.assert_close(identity(x), x, atol=1e-5, rtol=0)
    flipped = SimCLRAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_prob=1, jitter_prob=0,
                            grayscale_prob=0)
    torch.testing.assert_close(flipped(x), x.flip(-1), atol=1e-5, rtol=0)


def test_simclr_augment_views_differ_and_bad_input_is_refused():
    x = torch.rand(4, 1, 28, 28)
    v1, v2 = SimCLRAugment().views(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(v1, v2)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        simclr_augment(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="float"):
        simclr_augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRAugment(crop_scale=(0.0, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_simclr_augment_on_cuda_matches_cpu_for_one_seed():
    x = torch.rand(8, 3, 32, 32)
    cpu = simclr_augment(x, generator=torch.Generator().manual_seed(3))
    gpu = simclr_augment(x.cuda(), generator=torch.Generator().manual_seed(3))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ---- rotations ------------------------------------------------------------------------------
def test_rotations():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    out = rotate(x, torch.tensor([1, 2]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (-2, -1)))
    torch.testing.assert_close(out[1], x[1].flip(-1).flip(-2))
    expanded, labels = rotate_batch(x, "expand")
    assert expanded.shape == (8, 1, 3, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(expanded[6], torch.rot90(x[0], 3, (-2, -1)))
    rand, labels = rotate_batch(x, "rand", torch.Generator().manual_seed(0))
    assert rand.shape == x.shape and set(labels.tolist()) <= {0, 1, 2, 3}
    assert rotation_loss(torch.zeros(4, 4), torch.tensor([0, 1, 2, 3])).item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.rand(2, 1, 3, 4))
    with pytest.raises(ValueError, match="unknown mode"):
        rotate_batch(x, "all")


# ---- the network ----------------------------------------------------------------------------
def test_split_network_computes_the_source_model_and_round_trips(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet_fmnist", 10, 1).eval()
    encoder, classifier = split_classifier(source)
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(classifier(encoder(x)), source(x))
    net = build_network(source, {"projector": [32, 16]}).eval()
    assert net(x, head="projector").shape == (5, 16)
    arch = {"model": "resnet_fmnist", "model_kwargs": {}, "num_classes": 10, "in_channels": 1}
    save_network(net, tmp_path / "a", "cta", arch, extra={"note": 1})
    loaded, info = load_network(tmp_path / "a", kind="cta")
    assert info["note"] == 1 and info["heads"] == {"projector": [64, 32, 16]}
    torch.testing.assert_close(loaded(x, head="projector"), net(x, head="projector"))
    with pytest.raises(ValueError, match="not 'ttt'"):
        load_network(tmp_path / "a", kind="ttt")
    with pytest.raises(KeyError, match="no head 'rotation'"):
        net(x, head="rotation")
    with pytest.raises(ValueError, match="no nn.Linear"):
        split_classifier(nn.Conv2d(1, 1, 1))
