"""metatta.adaptation_room: the labelled oracles that bound what an optimizer of the norm affines
can add on the MGTTA benchmark's stream (benchmarks/adaptation_room.py runs them)."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatta import adaptation_room as room
from metatta.data.streams import build_stream
from metatta.data.types import DomainData
from metatta.learned.losses import record_features, stats_alignment_loss
from metatta.methods.common import softmax_entropy
from metatta.models.feature_stats import compute_feature_stats
from metatta.models.vit import ViTClassifier
from repo_scripts import load_script


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def tiny_stream(setting: str = "episodic"):
    """Two domains of 48 images whose class sets the brightness of a corner: learnable from labels."""
    rng = np.random.default_rng(0)
    domains = []
    for name in ("noise", "blur"):
        labels = rng.integers(0, 3, 48)
        images = rng.integers(0, 60, (48, 8, 8, 1))
        images[:, :4, :4, 0] += 90 * labels[:, None, None]
        domains.append(DomainData(name, 5, images.astype(np.uint8), labels))
    return build_stream(domains, setting, 8, seed=0)


def test_bn_row_is_the_unadapted_error_and_the_oracles_use_labels():
    model, stream = tiny_classifier(), tiny_stream()
    bn = room.online_errors(model, stream, None)
    assert list(bn) == ["noise-5", "blur-5"]
    with torch.no_grad():  # BN on batch statistics, no update: the same as predicting each batch afresh
        net, _ = room.norm_adapted(model)
        wrong = {d: 0 for d in bn}
        for x, y, d in stream:
            wrong[d] += int((net(x).argmax(1) != y).sum())
    assert bn == {d: 100.0 * w / 48 for d, w in wrong.items()}
    assert np.mean(list(bn.values())) > 40  # the source model has not learnt the task
    before = {k: v.clone() for k, v in model.state_dict().items()}
    online = room.online_errors(model, stream, 0.3)
    floor = room.floor_errors(model, stream, epochs=30, lr=0.1, seed=0)
    assert np.mean(list(floor.values())) < np.mean(list(online.values())) < np.mean(list(bn.values()))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the source model is untouched


def test_gradient_agreement_per_domain_means_of_per_batch_values():
    model, stream = tiny_classifier(), tiny_stream()
    agreement = room.gradient_agreement(model, stream)["entropy"]
    assert list(agreement) == ["noise-5", "blur-5"]
    x, y, domain = next(iter(stream))  # by hand, the first batch: one of the six the mean is over
    net, params = room.norm_adapted(model)
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])  # noqa: E731
    g_entropy, g_ce = flat(softmax_entropy(net(x)).mean()), flat(F.cross_entropy(net(x), y))
    first = float(g_entropy @ g_ce / (g_entropy.norm() * g_ce.norm()))
    assert -1.0 <= first <= 1.0
    per_batch = []
    for xb, yb, d in stream:
        if d == domain:
            ge, gc = flat(softmax_entropy(net(xb)).mean()), flat(F.cross_entropy(net(xb), yb))
            per_batch.append(float(ge @ gc / (ge.norm() * gc.norm())))
    assert per_batch[0] == pytest.approx(first)
    assert agreement[domain]["cosine"] == pytest.approx(np.mean(per_batch), abs=1e-6)
    assert all(0.0 <= a["sign_agreement"] <= 1.0 and a["batches"] == 6 for a in agreement.values())


def test_eata_reliable_loss_is_eatas_term_and_none_without_a_reliable_sample():
    losses = room.label_free_losses()
    confident = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # one reliable sample, one uniform
    h = softmax_entropy(confident)
    margin = 0.4 * np.log(3)
    assert float(losses["eata_reliable"](confident)) == pytest.approx(float(h[0] * torch.exp(margin - h[0])))
    assert losses["eata_reliable"](torch.zeros(2, 3)) is None
    assert float(losses["entropy"](confident)) == pytest.approx(float(h.mean()))


def test_parse_args_defaults():
    bench = load_script("benchmarks/adaptation_room.py")
    args = bench.parse_args([])
    assert (args.num_images, args.lrs, args.floor_epochs) == (1000, [1e-3, 1e-2, 3e-2], 20)


def test_the_vit_option_names_its_results_and_the_oracles_run_on_a_vit():
    bench = load_script("benchmarks/adaptation_room.py")
    assert bench.parse_args([]).source_config is None
    assert bench.default_tag(None, 1000) == "adaptation_room"
    assert bench.default_tag("configs/fmnist_c/source_vit.yaml", 1000) == "adaptation_room_vit"
    assert bench.default_tag("configs/fmnist_c/source_vit.yaml", 10000) == "adaptation_room_vit_n10000"
    torch.manual_seed(0)
    vit = ViTClassifier(num_classes=3, in_channels=1, img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2)
    net, params = room.norm_adapted(vit)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert len(params) == len(names) == 10 and all(".norm" in n for n in names)  # 2 blocks x 2 LN + final, w+b
    stream = tiny_stream()
    unadapted, online = room.online_errors(vit, stream, None), room.online_errors(vit, stream, 0.3)
    assert list(unadapted) == list(online) == ["noise-5", "blur-5"]
    assert "noise-5" in room.gradient_agreement(vit, stream)["entropy"]  # an untrained ViT: no reliable sample


def test_gradient_agreement_of_mgtta_vit_loss_uses_the_clean_cls_statistics():
    torch.manual_seed(0)
    vit = ViTClassifier(num_classes=3, in_channels=1, img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2)
    stream = tiny_stream()
    clean = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    stats = compute_feature_stats(vit, clean, batch_size=16)
    agreement = room.gradient_agreement(vit, stream, source_stats=stats)
    assert {"entropy", "entropy+stats", "stats"} <= set(agreement)
    x, y, domain = next(iter(stream))  # by hand, the first batch's cosine of the alignment term alone
    net, params = room.norm_adapted(vit)
    with record_features(net) as recorder:
        logits = net(x)
    flat = functools.partial(room._flat_gradient, params=params)  # 0 for the final norm: the taps are before it
    g_stats, g_ce = flat(stats_alignment_loss(recorder.features, stats)), flat(F.cross_entropy(logits, y))
    first = float(F.cosine_similarity(g_stats, g_ce, dim=0))
    per_batch = []
    for xb, yb, d in stream:
        if d == domain:
            with record_features(net) as rec:
                lb = net(xb)
            gs, gc = flat(stats_alignment_loss(rec.features, stats)), flat(F.cross_entropy(lb, yb))
            per_batch.append(float(F.cosine_similarity(gs, gc, dim=0)))
    assert per_batch[0] == pytest.approx(first)
    assert agreement["stats"][domain]["cosine"] == pytest.approx(np.mean(per_batch), abs=1e-5)
    assert "stats" not in room.gradient_agreement(vit, stream)  # no statistics, no feature losses
