"""MGTTA on the LayerNorm ViT: the authors' ViT loss (entropy + 0.4 x the mean/std alignment of the
CLS token after every block), chosen from the model (`loss: auto`), in MGTTA and in the MGG
meta-trainer's inner loop; and `optimizer: mgg` under Tent, EATA and DeYO on a ViT."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metatta.config import load_config
from metatta.data.domains import BENCHMARK_CORRUPTIONS as CORRUPTIONS_15, HELD_OUT_CORRUPTIONS
from metatta.data.types import DomainData
from metatta.learned.losses import loss_kind_for, record_features, stats_alignment_loss
from metatta.learned.meta_training import RolloutWorker, mgg_train_config, mgtta_config, split_domains
from metatta.learned.mgg import MGG
from metatta.methods import build_method
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.models.feature_stats import compute_feature_stats, is_vision_transformer
from method_checks import adapted_names
from trainers.mgg import train_mgg

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"

CORRUPTIONS = ["speckle_noise", "gaussian_blur"]
VIT_KWARGS = {"patch_size": 7, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("vit_tiny_fmnist", num_classes=10, in_channels=1, **VIT_KWARGS)
    with torch.no_grad():  # timm zero-inits the head: give the entropy a gradient and some confidence
        model.vit.head.weight.normal_(0, 2.0)
    return model.eval()


def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10)).eval()


def random_mgg(seed: int = 0) -> MGG:
    """An untrained MGG, its weights moved off their init so its output is not trivially zero."""
    torch.manual_seed(seed)
    mgg = MGG()
    with torch.no_grad():
        for p in mgg.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mgg


def ln_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- the loss -------------------------------------------------------------------------------------
def test_stats_alignment_by_hand_on_two_samples():
    # one tap, 2 samples of 2 features: mean (2, 3), unbiased std (sqrt 2, 1)
    features = [torch.tensor([[1.0, 2.5], [3.0, 3.5]])]
    stats = {"mean.0": torch.tensor([1.0, 3.0]), "std.0": torch.tensor([1.0, 2.0])}
    mean_sq = ((2 - 1) ** 2 + (3 - 3) ** 2) / 2
    std_sq = ((math.sqrt(2) - 1) ** 2 + (math.sqrt(0.5) - 2) ** 2) / 2
    assert float(stats_alignment_loss(features, stats)) == pytest.approx(mean_sq + std_sq, rel=1e-6)


def test_mgtta_loss_on_a_vit_is_entropy_plus_cls_statistics_of_every_block():
    model = tiny_vit()
    x = torch.rand(6, 1, 28, 28)
    stats = compute_feature_stats(model, torch.rand(32, 1, 28, 28))
    method = build_method("mgtta", model, {"channels_last": False}, mgg=random_mgg(), source_stats=stats)
    assert method.loss_fn.kind == "entropy+stats" and method.loss_fn.stats_lambda == 0.4

    # by hand: the CLS token after each block, its batch mean and unbiased std against the stored ones
    cls_tokens = []
    hooks = [b.register_forward_hook(lambda m, i, o: cls_tokens.append(o[:, 0].detach()))
             for b in model.vit.blocks]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    assert len(cls_tokens) == VIT_KWARGS["depth"]
    p = logits.softmax(1)
    entropy = float(-(p * p.log()).sum(1).mean())
    align = 0.0
    for i, f in enumerate(cls_tokens):
        mean, std = f.mean(0), f.std(0, unbiased=True)
        align += float(((mean - stats[f"mean.{i}"]) ** 2).mean() + ((std - stats[f"std.{i}"]) ** 2).mean())
    expected = entropy + 0.4 * align

    with torch.enable_grad():  # the method's own loss, through its feature recorder
        with record_features(model) as recorder:
            out = model(x)
            got = method.loss_fn(out, recorder.features).detach()
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert align > 0


def test_loss_auto_is_decided_by_the_model():
    vit, bn = tiny_vit(), tiny_bn_net()
    assert is_vision_transformer(vit) and not is_vision_transformer(bn)
    assert loss_kind_for("auto", vit) == "entropy+stats" and loss_kind_for("auto", bn) == "entropy"
    assert loss_kind_for("entropy", vit) == "entropy"  # named: as asked
    assert build_method("mgtta", bn, {"channels_last": False}, mgg=random_mgg()).loss_fn.kind == "entropy"
    with pytest.raises(ValueError, match="mgtta: loss 'auto' on ViTClassifier is entropy\\+stats, which needs "
                                         "source_stats"):
        build_method("mgtta", tiny_vit(), {}, mgg=random_mgg())
    with pytest.raises(ValueError, match="mgtta: config.loss must be one of"):
        build_method("mgtta", bn, {"loss": "stats"}, mgg=random_mgg())


def test_mgtta_adapts_the_vit_layernorm_affines_only():
    model = tiny_vit()
    stats = compute_feature_stats(model, torch.rand(32, 1, 28, 28))
    before = ln_params(model)
    method = build_method("mgtta", model, {"lr": 0.05}, mgg=random_mgg(), source_stats=stats)
    method(torch.rand(8, 1, 28, 28))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".norm" in n for n in changed)
    assert method.skipped_updates == 0


# ---- the meta-trainer's inner loop ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    model = tiny_vit()
    stats = compute_feature_stats(model, torch.rand(64, 1, 28, 28))
    path = tmp_path_factory.mktemp("src") / "vit.pt"
    return save_checkpoint(path, model, model_name="vit_tiny_fmnist", model_kwargs=VIT_KWARGS, num_classes=10,
                           in_channels=1, feature_stats=stats)


@pytest.fixture(scope="module")
def domains():
    rng = np.random.default_rng(0)
    return [DomainData(c, 5, rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8),
                       rng.integers(0, 10, 24).astype(np.int64)) for c in CORRUPTIONS]


def vit_mgg_config(tmp_path, checkpoint, **overrides):
    data = dict(name="vit", source_checkpoint=str(checkpoint), corruptions=CORRUPTIONS, train_images=16,
                val_images=8, batch_size=2, epochs=1, num_actors=2, checkpoint_dir=str(tmp_path / "ckpt"),
                checkpoint_every=10, log_every=1, device="cpu", val_batch_size=8, mlflow=False, register_as=None,
                loss="auto", unroll_steps=2, inner_lr=1e-2)
    data.update(overrides)
    return mgg_train_config(data)


def test_the_meta_trainer_inner_loop_uses_the_vit_loss(tmp_path, vit_checkpoint, domains):
    cfg = vit_mgg_config(tmp_path, vit_checkpoint, unroll_steps=1)
    shares, _ = split_domains(domains, cfg)
    worker = RolloutWorker(shares[0], str(vit_checkpoint), cfg, index=0)
    assert repr(worker.trajectory.loss_fn).startswith("TTALoss(entropy+stats, lambda=0.4")
    out = worker.run({k: v.clone() for k, v in worker.mgg.state_dict().items()})
    assert np.isfinite(out["metrics"]["meta_loss"])
    assert sum(float(g.abs().sum()) for g in out["grads"].values()) > 0
    with pytest.raises(ValueError, match="train_mgg.loss 'nope' is not one of"):
        vit_mgg_config(tmp_path, vit_checkpoint, loss="nope")


def test_tiny_meta_training_on_a_vit(tmp_path, vit_checkpoint, domains):
    cfg = vit_mgg_config(tmp_path, vit_checkpoint, train_images=24, unroll_steps=2)
    outcome = train_mgg(cfg, use_ray=False, domains=domains)
    assert outcome.steps > 0 and math.isfinite(outcome.validation_error)
    assert all(np.isfinite(h["meta_loss"]) for h in outcome.history if "meta_loss" in h)
    assert mgtta_config(cfg)["loss"] == "auto"  # MGTTA resolves it on the same ViT: entropy+stats


# ---- optimizer: mgg under Tent, EATA and DeYO on the ViT -------------------------------------------
@pytest.mark.parametrize("name,config", [
    ("tent", {}),
    ("eata", {"use_fisher": False, "entropy_factor": 1.0}),
    ("deyo", {"entropy_factor": 1.0, "plpd_threshold": -1.0}),
])
def test_an_untrained_mgg_steps_tent_eata_and_deyo_on_a_vit(name, config):
    model = tiny_vit()
    before = ln_params(model)
    method = build_method(name, model, {"optimizer": "mgg", "lr": 0.05, **config}, mgg=random_mgg())
    assert type(method.optimizer).__name__ == "MGGOptimizer"
    torch.manual_seed(0)
    for _ in range(2):
        logits = method(torch.rand(8, 1, 28, 28))
        assert torch.isfinite(logits).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, f"{name}: the MGG moved nothing"
    assert all(n.rsplit(".", 1)[0].split(".")[-1].startswith("norm") for n in changed), changed
    assert method.skipped_updates == 0


# ---- the ViT settings files: which parameters each method adapts on the ViT, by name ---------------
def vit_settings(name: str) -> dict:
    path = CONFIG_DIR / f"{name}_vit.yaml"
    return load_config(path) if path.exists() else {}


LN_NAMES = {f"vit.blocks.{b}.{n}.{w}" for b in range(2) for n in ("norm1", "norm2") for w in ("weight", "bias")}
FINAL_NORM = {"vit.norm.weight", "vit.norm.bias"}
PATCH_CONV = {"vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}


@pytest.mark.parametrize("name,expected", [
    ("tent", LN_NAMES | FINAL_NORM),  # every LayerNorm (SAR's tent.py)
    ("eata", LN_NAMES | FINAL_NORM),  # every LayerNorm (their eata.collect_params)
    ("sar", {n for n in LN_NAMES if ".blocks.0." in n}),  # not the top quarter (block 1 of 2) nor the final norm
    ("deyo", {n for n in LN_NAMES if ".blocks.0." in n}),  # SAR's rule, as their code
    ("palm", LN_NAMES | FINAL_NORM | PATCH_CONV),  # norm layers and Conv2d: the patch embedding is a Conv2d
    ("law", LN_NAMES | FINAL_NORM | PATCH_CONV),
])
def test_each_method_adapts_the_vit_parameters_its_rule_names(name, expected):
    config = {**vit_settings(name), **({"use_fisher": False} if name == "eata" else {})}
    method = build_method(name, tiny_vit(), config, batch_size=64)
    assert adapted_names(method) == expected


def test_cotta_on_the_vit_adapts_every_parameter_with_its_vit_settings():
    model = tiny_vit()
    method = build_method("cotta", model, vit_settings("cotta"), batch_size=64)
    assert adapted_names(method) == {n for n, _ in model.named_parameters()}
    assert type(method.optimizer).__name__ == "SGD" and method.config.lr == 0.005


def test_mgg_vit_config_mirrors_the_resnet_one_on_held_out_corruptions():
    fmnist = Path(__file__).resolve().parents[1] / "configs" / "fmnist_c"
    vit = vars(mgg_train_config(load_config(fmnist / "mgg_vit.yaml")))
    resnet = vars(mgg_train_config(load_config(fmnist / "mgg.yaml")))
    differs = {k for k in vit if vit[k] != resnet[k]}
    # and the lr, chosen for the ViT on the held-out validation (configs/fmnist_c/mgg_vit.yaml says how)
    assert differs == {"name", "source_config", "checkpoint_dir", "register_as", "inner_lr", "test_lr"}
    assert vit["inner_lr"] == vit["test_lr"] == 1e-2
    assert vit["source_config"] == "configs/fmnist_c/source_vit.yaml" and vit["register_as"] == "mgg_vit"
    assert set(vit["corruptions"]) == set(HELD_OUT_CORRUPTIONS) and not set(vit["corruptions"]) & set(CORRUPTIONS_15)
    assert vit["loss"] == "entropy+stats"  # on the ViT: the authors' CLS-statistics loss
