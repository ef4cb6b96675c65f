"""AdaContrast (metatta.methods.adacontrast): parameters adapted by name, the soft kNN
pseudo-label refinement, the queue and bank updates and the class-aware InfoNCE masking against
hand-computed values, one step's key encoder / queue / bank / prediction, the views, reset,
non-finite batches, the settings files, the learned optimizer."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metatta.config import load_config
from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.adacontrast import (
    class_aware_instance_loss,
    gaussian_blur_per_image,
    instance_logits,
    soft_knn_pseudo_labels,
    strong_view,
    update_bank,
    weak_view,
)
from metatta.methods.common import features_and_logits
from method_checks import adapted_names, assert_nan_batch_skipped, assert_reset_restores_source, tiny_vit
from test_methods import TinyBNNet, batches

FAST = {"lr": 0.01, "queue_size": 64, "refine_after": 16}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


def test_defaults_are_the_broadest_codebases_cifar_setting():
    cfg = method_class("adacontrast").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
        "sgd", 2e-4, 200, 0.9, True, 1e-4)
    assert (cfg.queue_size, cfg.key_momentum, cfg.temperature, cfg.contrast_type, cfg.ce_views) == (
        16384, 0.999, 0.07, "class_aware", "weak_strong")
    assert (cfg.alpha, cfg.beta, cfg.eta, cfg.refine, cfg.num_neighbors, cfg.distance, cfg.refine_after) == (
        1.0, 1.0, 1.0, True, 10, "cosine", 1024)


def test_nesterov_sgd_scaled_below_the_published_batch():
    method = build_method("adacontrast", TinyBNNet(), {"queue_size": 8}, batch_size=64)
    group = method.optimizer.param_groups[0]
    assert isinstance(method.optimizer, torch.optim.SGD)
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert math.isclose(group["lr"], 2e-4 * 64 / 200)


def test_adapts_every_parameter_of_a_bn_net_and_a_vit():
    method = build_method("adacontrast", TinyBNNet(), FAST)
    assert adapted_names(method) == {n for n, _ in method.model.named_parameters()}
    assert "fc.weight" in adapted_names(method) and "layer1.0.weight" in adapted_names(method)
    assert not any(p.requires_grad for p in method.key_encoder.parameters())
    vit = build_method("adacontrast", tiny_vit(), FAST)
    assert adapted_names(vit) == {n for n, _ in vit.model.named_parameters()}


def test_soft_knn_vote_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.1], [0.9, 0.5], [0.0, 1.0], [-1.0, 0.0], [5.0, 0.0]])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    # cosine: row 0 is nearest to [5, 0] (1.0) and [1, 0.1] (0.995); row 1 to [0, 1] (1.0) and [0.9, 0.5] (0.486)
    labels, refined = soft_knn_pseudo_labels(features, bank, probs, num_neighbors=2)
    torch.testing.assert_close(refined, torch.tensor([[0.35, 0.1, 0.55], [0.15, 0.5, 0.35]]))
    assert labels.tolist() == [2, 1]
    # euclidean: [5, 0] is 4 away from row 0; its nearest are [1, 0.1] (0.1) and [0.9, 0.5] (0.51)
    labels, refined = soft_knn_pseudo_labels(features, bank, probs, num_neighbors=2, distance="euclidean")
    torch.testing.assert_close(refined, torch.tensor([[0.4, 0.5, 0.1], [0.15, 0.5, 0.35]]))
    assert labels.tolist() == [1, 1]


def test_pseudo_labels_are_the_argmax_until_refine_after_images_then_the_vote():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "num_neighbors": 1, "refine_after": 4})
    method.bank_features = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    method.bank_probs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    features, logits = torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    method.seen = 3
    assert method.pseudo_labels(features, logits).tolist() == [0]  # argmax of the logits
    method.seen = 4
    assert method.pseudo_labels(features, logits).tolist() == [1]  # the nearest bank entry's class


def test_queue_is_a_ring_buffer_by_hand():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "queue_size": 4})
    method.queue = torch.zeros(4, 8)
    method.queue_labels = torch.zeros(4, dtype=torch.long)
    method.queue_pointer = 3
    keys = torch.stack([torch.full((8,), 1.0), torch.full((8,), 2.0)])
    method.enqueue(keys, torch.tensor([5, 6]))
    assert method.queue[:, 0].tolist() == [2.0, 0.0, 0.0, 1.0] and method.queue_labels.tolist() == [6, 0, 0, 5]
    assert method.queue_pointer == 1


def test_bank_grows_to_its_size_then_is_a_ring_buffer_with_their_pointer():
    features, probs, pointer = torch.zeros(0, 1), torch.zeros(0, 2), 0
    rows = [torch.tensor([[float(i)], [float(i) + 0.5]]) for i in range(4)]
    for row in rows[:2]:
        features, probs, pointer = update_bank(features, probs, pointer, row, torch.ones(2, 2), size=4)
    # their pointer while growing: (pointer + 2) % the new length, 2 % 2 = 0, then 2 % 4 = 2
    assert features.flatten().tolist() == [0.0, 0.5, 1.0, 1.5] and pointer == 2
    features, probs, pointer = update_bank(features, probs, pointer, rows[2], torch.zeros(2, 2), size=4)
    assert features.flatten().tolist() == [0.0, 0.5, 2.0, 2.5] and pointer == 0  # slots 2, 3
    assert probs[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    features, probs, pointer = update_bank(features, probs, pointer, rows[3], torch.zeros(2, 2), size=4)
    assert features.flatten().tolist() == [3.0, 3.5, 2.0, 2.5] and pointer == 2


def test_instance_logits_and_the_class_aware_mask_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(instance_logits(q, k, queue, 0.5), torch.tensor([[1.2, 0.0, -2.0]]))
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    labels, queue_labels = torch.tensor([0, 1]), torch.tensor([0, 1, 1])
    # row 0 (label 0) loses the negative of queue entry 0; row 1 (label 1) those of entries 1 and 2
    expected = ((-2.0 + math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
                + (0.0 + math.log(math.exp(0.0) + math.exp(3.0)))) / 2
    assert math.isclose(class_aware_instance_loss(logits, labels, queue_labels).item(), expected, rel_tol=1e-6)
    plain = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(class_aware_instance_loss(logits, labels, None), plain)


def test_one_step_key_encoder_queue_bank_and_prediction():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "key_momentum": 0.5, "refine_after": 10 ** 6,
                                                       "channels_last": False})
    x = batches(1)[0]
    student = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    key_before = {n: p.detach().clone() for n, p in method.key_encoder.named_parameters()}
    old_queue = method.queue.clone()
    running_mean = method.model.layer1[1].running_mean.clone()
    torch.manual_seed(3)
    out = method(x)
    torch.manual_seed(3)  # the same views: weak, then the two strong ones
    x_weak, _, x_key = weak_view(x), strong_view(x), strong_view(x)
    # the key encoder followed the student as it was before the step: 0.5 k + 0.5 s
    for n, p in method.key_encoder.named_parameters():
        torch.testing.assert_close(p, 0.5 * key_before[n] + 0.5 * student[n])
    assert not torch.equal(method.model.fc.weight, student["fc.weight"])  # the student stepped
    # the queue's first 16 rows: the key encoder's normalized features of the second strong view,
    # labelled with argmax of the student's weak-view logits (refinement not yet on); the rest unchanged
    source = TinyBNNet().train()
    with torch.no_grad():
        labels = source(x_weak).argmax(1)
    assert method.queue_labels[:16].tolist() == labels.tolist() and method.queue_pointer == 16
    torch.testing.assert_close(method.queue[16:], old_queue[16:], rtol=0, atol=0)
    with torch.no_grad():
        # the key encoder's BN ran a train-mode pass on the key view before: same batch statistics
        keys, _ = features_and_logits(method.key_encoder, method.key_classifier, x_key)
        weak_features, weak_logits = features_and_logits(method.key_encoder, method.key_classifier, x_weak)
    torch.testing.assert_close(method.queue[:16], F.normalize(keys, dim=1))
    # the bank: the key encoder's features and probabilities on the weak view, after the step
    torch.testing.assert_close(method.bank_features, weak_features)
    torch.testing.assert_close(method.bank_probs, weak_logits.softmax(1))
    # the prediction: the adapted student in eval mode (BN running statistics, moved in train mode)
    assert not torch.equal(method.model.layer1[1].running_mean, running_mean)
    method.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, method.model(x), rtol=0, atol=0)


def test_predict_statistics_batch_uses_the_test_batchs_bn_statistics():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "predict_statistics": "batch", "channels_last": False})
    x = batches(1)[0]
    out = method(x)
    method.model.train()
    with torch.no_grad():
        torch.testing.assert_close(out, method.model(x), rtol=0, atol=0)
    method.model.eval()
    with torch.no_grad():
        assert not torch.allclose(out, method.model(x))


def test_views_keep_shape_and_range_and_draw_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 28, 28, generator=g).repeat(64, 1, 1, 1)
    y = strong_view(x, generator=g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert len({round(v, 5) for v in y.mean((1, 2, 3)).tolist()}) > 32  # drawn per image
    rgb = strong_view(torch.rand(8, 3, 32, 32, generator=g), generator=g)
    assert rgb.shape == (8, 3, 32, 32) and torch.isfinite(rgb).all()
    flipped = weak_view(x, generator=g)
    same = (flipped == x).flatten(1).all(1)
    assert torch.equal(flipped[~same], x[~same].flip(-1)) and 0 < int(same.sum()) < 64
    constant = torch.full((2, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur_per_image(constant, torch.tensor([0.1, 2.0])), constant)


def test_reset_restores_the_source_bit_for_bit():
    method = build_method("adacontrast", TinyBNNet(), FAST)
    assert_reset_restores_source(method, batches(3))
    assert method.seen == 16  # the one batch assert_reset_restores_source ran after the reset


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("adacontrast", TinyBNNet(), FAST)
    assert_nan_batch_skipped(method, [batches(1)[0], batches(1, seed=3)[0], batches(1, seed=2)[0]])


def test_batch_size_one_and_several_steps():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "refine_after": 2, "steps": 2})
    for x in batches(3, batch_size=1):
        assert torch.isfinite(method(x)).all()
    assert method.seen == 6 and method.queue_pointer == 6 and len(method.bank_features) == 6
    assert method.skipped_updates == 0


def test_bad_values_are_refused_naming_the_field():
    for field, value in (("distance", "manhattan"), ("queue_size", 0), ("contrast_type", "x"), ("temperature", 0.0),
                         ("predict_statistics", "mixed")):
        with pytest.raises(ValueError, match=rf"^adacontrast: config\.{field} must be"):
            method_class("adacontrast").make_config({field: value})


def test_settings_files_build():
    overrides = load_config(CONFIG_DIR / "adacontrast_imagenet.yaml")
    assert overrides == {"lr_batch_size": 64}
    method = build_method("adacontrast", TinyBNNet(), {**overrides, "queue_size": 8}, batch_size=64)
    assert method.optimizer.param_groups[0]["lr"] == 2e-4


def test_steps_with_the_learned_optimizer():
    method = build_method("adacontrast", TinyBNNet(), {**FAST, "optimizer": "mgg", "lr": 0.05}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
