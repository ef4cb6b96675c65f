"""DeYO (metatta.methods.deyo): parameters adapted on a BN ResNet-like net and on a LayerNorm ViT,
the patch shuffle, PLPD, the two filters and the weights against hand-computed values, reset,
non-finite batches, the learned optimizer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metatta.learned.mgg import MGG
from metatta.methods import build_method, method_class
from metatta.methods.deyo import deyo_weights, occlude, plpd, shuffle_patches, shuffle_pixels
from method_checks import adapted_names, assert_reset_restores_source, method_state, tiny_vit
from test_methods import TinyBNNet, assert_same_state, batches


def test_defaults_are_the_authors_resnet_settings():
    cfg = method_class("deyo").Config()
    assert (cfg.optimizer, cfg.lr, cfg.lr_batch_size, cfg.momentum) == ("sgd", 0.00025, 32, 0.9)
    assert (cfg.entropy_factor, cfg.reweight_factor, cfg.plpd_threshold) == (0.5, 0.4, 0.2)
    assert (cfg.augmentation, cfg.patch_grid) == ("patch", 4)


@pytest.mark.parametrize("field, value", [("augmentation", "blur"), ("patch_grid", 0), ("occlusion_size", 1.5)])
def test_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"deyo: config.{field}"):
        build_method("deyo", TinyBNNet(), {field: value})


# ---- what it adapts ----------------------------------------------------------------------------
def test_adapts_the_norm_affines_below_the_top_layers_of_a_bn_net():
    method = build_method("deyo", TinyBNNet())
    assert adapted_names(method) == {"layer1.1.weight", "layer1.1.bias"}  # layer2 is the top quarter


def test_adapts_the_layernorms_below_the_top_blocks_of_a_vit():
    method = build_method("deyo", tiny_vit(), {"lr": 0.05, "plpd_threshold": -1.0})
    expected = {f"vit.blocks.{b}.{n}.{p}" for b in range(3) for n in ("norm1", "norm2") for p in ("weight", "bias")}
    assert adapted_names(method) == expected  # blocks.3 and the final vit.norm are SAR's top layers
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    moved = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= expected


# ---- the mechanism, by hand ----------------------------------------------------------------------------
def test_patch_shuffle_moves_whole_patches_by_the_drawn_permutation():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = shuffle_patches(x, 2, generator=torch.Generator().manual_seed(3))
    order = torch.argsort(torch.rand(2, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    for b in range(2):
        for k in range(4):  # output patch k is input patch order[b, k]; patch k = row k // 2, column k % 2
            src = int(order[b, k])
            got = out[b, 0, 2 * (k // 2):2 * (k // 2) + 2, 2 * (k % 2):2 * (k % 2) + 2]
            want = x[b, 0, 2 * (src // 2):2 * (src // 2) + 2, 2 * (src % 2):2 * (src % 2) + 2]
            assert torch.equal(got, want)
    assert shuffle_patches(torch.rand(3, 2, 6, 6), 4).shape == (3, 2, 6, 6)  # resized to 4x4 and back


def test_pixel_shuffle_and_occlusion():
    x = torch.rand(2, 3, 4, 4)
    out = shuffle_pixels(x)
    assert torch.equal(out.sort(-1).values.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)
    occluded = occlude(x, 0.5, 0.25)  # rows and columns 1..2 of 4
    assert torch.equal(occluded[:, :, 1:3, 1:3], x.mean((2, 3), keepdim=True).expand(2, 3, 2, 2))
    assert torch.equal(occluded[:, :, 0], x[:, :, 0]) and torch.equal(occluded[:, :, 3], x[:, :, 3])


def test_plpd_and_weights_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    destroyed = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(plpd(probs, destroyed), torch.tensor([0.5, -0.2]))
    entropy, values = torch.tensor([0.3, 0.9]), torch.tensor([0.5, 0.25])
    want = torch.tensor([math.exp(0.4 - 0.3) + math.exp(0.5), math.exp(0.4 - 0.9) + math.exp(0.25)])
    torch.testing.assert_close(deyo_weights(entropy, values, 0.4), want)
    torch.testing.assert_close(deyo_weights(entropy, values, 0.4, reweight_plpd=False), want - values.exp())
    torch.testing.assert_close(deyo_weights(entropy, values, 0.4, False, False), torch.ones(2))


class ChannelMeanNet(nn.Module):
    """logits = LayerNorm(per-channel image means): unchanged by any shuffle of positions."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return 2.0 * self.norm(x.mean((2, 3)))


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


def test_filters_and_loss_by_hand():
    # Constant images: image i has channel values v_i, so logits_i = 2 * (v_i - mean v_i) / std v_i.
    values = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.3, 0.3, 0.1]])
    x = values[:, :, None, None].expand(4, 3, 8, 8).contiguous()
    centred = values - values.mean(1, keepdim=True)
    logits = 2.0 * centred / (centred.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    entropy = entropy_of(logits)
    margin = 0.5 * math.log(3)
    kept = entropy < margin
    assert kept.tolist() == [True, False, True, False]  # two tied top classes: H > 0.5 ln 3

    # The shuffle leaves this model's prediction as it was: PLPD = 0 < 0.2, no sample, no update.
    method = build_method("deyo", ChannelMeanNet(), {"excluded_modules": [], "channels_last": False})
    assert method.loss(x, method.model(x)) is None
    assert method.last_entropy_selection.tolist() == [True, False, True, False]
    torch.testing.assert_close(method.last_plpd, torch.zeros(2), atol=1e-6, rtol=0)

    # With the PLPD filter below zero both confident images count, weighted exp(E0 - H) + exp(0).
    method = build_method("deyo", ChannelMeanNet(), {"excluded_modules": [], "channels_last": False,
                                                     "plpd_threshold": -0.1})
    loss = method.loss(x, method.model(x))
    chosen = entropy[kept]
    weights = torch.exp(0.4 * math.log(3) - chosen) + 1.0
    torch.testing.assert_close(method.last_weights, weights, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, (chosen * weights).mean(), atol=1e-5, rtol=0)
    assert method.last_selection.tolist() == [True, False, True, False]


def test_plpd_is_measured_on_the_shuffled_kept_samples():
    x = batches(1)[0]
    with torch.no_grad():  # an entropy threshold between the batch's entropies: some samples pass, some not
        median_entropy = float(entropy_of(build_method("bn", TinyBNNet())(x)).median())
    method = build_method("deyo", TinyBNNet(), {"plpd_threshold": -1.0,
                                                "entropy_factor": median_entropy / math.log(10)})
    torch.manual_seed(5)
    logits = method.model(x)
    method.loss(x, logits)
    kept = method.last_entropy_selection
    assert 0 < int(kept.sum()) < len(x)
    torch.manual_seed(5)
    with torch.no_grad():
        destroyed = method.model(shuffle_patches(x[kept], 4)).softmax(1)
    torch.testing.assert_close(method.last_plpd, plpd(logits[kept].detach().softmax(1), destroyed))


# ---- state ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_model", [TinyBNNet, tiny_vit])
def test_reset_restores_the_source_bit_for_bit(make_model):
    method = build_method("deyo", make_model(), {"lr": 0.05, "plpd_threshold": -1.0})
    torch.manual_seed(0)
    assert_reset_restores_source(method, batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("deyo", TinyBNNet(), {"lr": 0.05, "plpd_threshold": -1.0})
    method(batches(1)[0])
    before = method_state(method)
    method(torch.full((16, 3, 16, 16), float("nan")))
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(batches(1, seed=2)[0])).all()


def test_steps_with_the_learned_optimizer():
    method = build_method("deyo", TinyBNNet(), {"optimizer": "mgg", "lr": 0.05, "plpd_threshold": -1.0}, mgg=MGG())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method(batches(1)[0])
    assert any(not torch.equal(p, before[n]) for n, p in method.model.named_parameters())
