"""The ViT's convolutional stem (`stem: conv`): the patch stem stays the default and unchanged, the
conv stem has no normalization (no batch statistics), trains and saves/loads deterministically, and
the LayerNorm methods adapt what their rules name on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from metatta import source
from metatta.config import load_config
from metatta.methods import build_method
from metatta.models import build_model, load_source_model
from metatta.models.checkpoint import load_feature_stats, read_header
from metatta.models.feature_stats import feature_taps
from metatta.models.vit import ConvStemEmbed
from method_checks import adapted_names
from test_vit_mgtta import FINAL_NORM, LN_NAMES, vit_settings

TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
CONV_STEM = {"stem": "conv", "stem_channels": [4, 8, 8]}


def conv_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("vit_tiny_fmnist", 10, 1, **TINY, **CONV_STEM)
    with torch.no_grad():  # timm zero-inits the head: give the entropy a gradient
        model.vit.head.weight.normal_(0, 2.0)
    return model.eval()


def test_the_patch_stem_is_the_default_and_builds_the_same_weights_as_before():
    """Existing checkpoints and configs (no `stem`) rebuild exactly: same modules, same random init."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_fmnist", 10, 1, patch_size=7, **TINY)
    torch.manual_seed(0)
    plain = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, **TINY,
                              global_pool="token", class_token=True)
    ours, theirs = model.vit.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_conv_stem_makes_16_tokens_from_three_stride_2_convolutions_without_any_norm():
    model = conv_vit()
    embed = model.vit.patch_embed
    assert isinstance(embed, ConvStemEmbed) and embed.num_patches == 16 and embed.grid_size == (4, 4)
    assert model.vit.pos_embed.shape == (1, 17, 16)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in embed.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(feature_taps(model)) == 2
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in embed.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 4, (2, 2)), (4, 8, (2, 2)), (8, 8, (2, 2)), (8, 16, (1, 1))]


def test_bad_stem_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="stem must be one of patch, conv, got 'convs'"):
        build_model("vit_tiny_fmnist", 10, 1, stem="convs")
    with pytest.raises(ValueError, match="stem_channels must be a non-empty list"):
        build_model("vit_tiny_fmnist", 10, 1, stem="conv", stem_channels=[])
    with pytest.raises(ValueError, match="stem_channels must be a non-empty list"):
        build_model("vit_tiny_fmnist", 10, 1, stem="conv", stem_channels=[8, 0])


def random_split(dataset: str, split: str):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 256 if split == "train" else 64
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_a_conv_stem_vit_trains_and_saves_loads_deterministically_with_its_cls_statistics(tmp_path):
    config = {"model": "vit_tiny_fmnist", "model_kwargs": {**TINY, **CONV_STEM}, "optimizer": "adamw", "lr": 1e-3,
              "weight_decay": 0.05, "channels_last": False, "epochs": 1, "batch_size": 32,
              "feature_stats_images": 64, "device": "cpu", "progress": False}
    first = source.train_source({**config, "output": str(tmp_path / "a.pt")}, random_split)
    second = source.train_source({**config, "output": str(tmp_path / "b.pt")}, random_split)
    a, b = load_source_model(first.checkpoint), load_source_model(second.checkpoint)
    assert isinstance(a.vit.patch_embed, ConvStemEmbed)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    fresh = conv_vit()
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), fresh.state_dict().values()))
    assert read_header(first.checkpoint)["model_kwargs"] == {**TINY, **CONV_STEM}
    stats = load_feature_stats(first.checkpoint)
    assert sorted(stats) == sorted(f"{k}.{i}" for i in range(2) for k in ("mean", "std"))  # CLS token, every block
    assert stats["mean.0"].shape == (16,)


STEM_CONVS = {f"vit.patch_embed.{m}.{w}" for m in ("convs.0", "convs.2", "convs.4", "proj") for w in ("weight", "bias")}


@pytest.mark.parametrize("name,expected", [
    ("tent", LN_NAMES | FINAL_NORM),  # every LayerNorm; the stem has no norm layer to add
    ("eata", LN_NAMES | FINAL_NORM),
    ("sar", {n for n in LN_NAMES if ".blocks.0." in n}),
    ("deyo", {n for n in LN_NAMES if ".blocks.0." in n}),
    ("palm", LN_NAMES | FINAL_NORM | STEM_CONVS),  # norm layers and every Conv2d: the stem's convolutions
    ("law", LN_NAMES | FINAL_NORM | STEM_CONVS),
])
def test_each_method_adapts_what_its_rule_names_on_a_conv_stem_vit(name, expected):
    config = {**vit_settings(name), **({"use_fisher": False} if name == "eata" else {})}
    method = build_method(name, conv_vit(), config, batch_size=64)
    assert adapted_names(method) == expected


def test_the_shipped_vit_source_recipe_has_the_conv_stem_and_no_batch_statistics():
    cfg = source.source_train_config(load_config(Path(__file__).parents[1] / "configs" / "fmnist_c" / "source_vit.yaml"))
    model = build_model(cfg.model, cfg.num_classes, cfg.in_channels, **cfg.model_kwargs)
    assert isinstance(model.vit.patch_embed, ConvStemEmbed) and model.vit.patch_embed.num_patches == 16
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in model.modules())
    assert len(feature_taps(model)) == 6
