"""Issue #24.9: CTA's test-time views mirror images only when its network was trained with mirrors.

The adapter records the augmentation training used (adapter.json "augmentation"), the loaded network
carries it (`MultiHeadNet.trained_augmentation`), and CTA's `hflip: auto` follows it; an adapter
written before the record flips as before; `hflip: true | false` overrides."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metatta.config import ConfigError
from metatta.data.types import DomainData
from metatta.methods.base import build_method
from metatta.methods.cta import CTAConfig
from metatta.models import build_model
from metatta.models.checkpoint import save_checkpoint
from metatta.ssl import build_network, load_network, save_network
from metatta.ssl.stages import cta_train_config
from trainers.cta import train_cta

WIDTHS = [4, 8, 8]
ARCH = {"model": "resnet_fmnist", "model_kwargs": {"widths": WIDTHS}, "num_classes": 10, "in_channels": 1}


def tiny_source() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_fmnist", 10, 1, widths=WIDTHS)


def adapter(tmp_path, augmentation: dict | None):
    """A saved and reloaded CTA network; `augmentation` None: written without the record (an old adapter)."""
    net = build_network(tiny_source(), {"projector": [8, 8]})
    if augmentation is not None:
        net.trained_augmentation = augmentation
    directory = save_network(net, tmp_path / "adapter", "cta", ARCH)
    assert ("augmentation" in json.loads((directory / "adapter.json").read_text())) == (augmentation is not None)
    return load_network(directory, kind="cta")[0]


@pytest.fixture
def flip_signs(monkeypatch):
    """The horizontal scale of every SimCLR crop grid built while the test runs: < 0 is a mirror."""
    signs = []
    affine_grid = F.affine_grid

    def spy(theta, *args, **kwargs):
        signs.append(torch.sign(theta[:, 0, 0]).detach().cpu())
        return affine_grid(theta, *args, **kwargs)

    monkeypatch.setattr("metatta.ssl.augment.F.affine_grid", spy)
    return signs


def adapt_once(net, **config) -> tuple:
    method = build_method("cta", tiny_source(), {"steps": 1, **config}, cta_model=net)
    torch.manual_seed(0)
    method(torch.rand(16, 1, 28, 28))
    return method


def mirrored(signs) -> int:
    return int((torch.cat(signs) < 0).sum())


def test_an_adapter_trained_without_flips_never_flips_at_test_time(tmp_path, flip_signs):
    net = adapter(tmp_path, {"hflip": False})
    assert net.trained_augmentation == {"hflip": False}
    method = adapt_once(net)
    assert method.config.hflip is False and method.augment.hflip_prob == 0
    assert flip_signs and mirrored(flip_signs) == 0


def test_an_old_adapter_without_the_record_flips_as_before(tmp_path, flip_signs):
    net = adapter(tmp_path, None)
    assert net.trained_augmentation == {}
    method = adapt_once(net)
    assert method.config.hflip is True and method.augment.hflip_prob == 0.5
    assert mirrored(flip_signs) > 0  # 32 views at p = 0.5


def test_the_method_config_overrides_the_record(tmp_path, flip_signs):
    assert adapt_once(adapter(tmp_path / "a", {"hflip": False}), hflip=True).augment.hflip_prob == 0.5
    assert mirrored(flip_signs) > 0
    flip_signs.clear()
    assert adapt_once(adapter(tmp_path / "b", None), hflip=False).augment.hflip_prob == 0
    assert mirrored(flip_signs) == 0


def test_bad_hflip_values_are_refused_naming_the_field(tmp_path):
    for bad in ("sometimes", 1, None, "false"):
        with pytest.raises(ConfigError, match="hflip"):
            build_method("cta", tiny_source(), {"hflip": bad})
    with pytest.raises(ValueError, match=r"cta: config\.hflip must be 'auto', true or false"):
        CTAConfig(hflip="sometimes").validate()
    net = build_network(tiny_source(), {"projector": [8, 8]})
    directory = save_network(net, tmp_path / "bad", "cta", ARCH, extra={"augmentation": {"hflip": "no"}})
    with pytest.raises(ValueError, match="adapter.json field 'augmentation'"):
        load_network(directory, kind="cta")


def test_training_on_digits_records_no_flips_and_validates_without_them(tmp_path, flip_signs):
    """hflip auto resolves to false for a digits source: no stage, no validation and the adapter mirror."""
    model = tiny_source()
    checkpoint = save_checkpoint(tmp_path / "digits.pt", model, model_name="resnet_fmnist",
                                 model_kwargs={"widths": WIDTHS}, num_classes=10, in_channels=1, dataset="digits")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 32)
    cfg = cta_train_config({
        "name": "t", "method": "cta", "source_checkpoint": str(checkpoint), "checkpoint_dir": str(tmp_path / "ck"),
        "simclr": {"epochs": 1, "batch_size": 16}, "align": {"epochs": 1, "batch_size": 16}, "head_hidden": 8,
        "projection_dim": 8, "mlflow": False, "register_as": None, "device": "cpu", "progress": False,
        "val_batch_size": 16, "method_config": {"steps": 1}})
    outcome = train_cta(cfg, use_ray=False, data=(images, labels.astype(np.int64)),
                        domains=[DomainData("fog", 5, images[:16], labels[:16].astype(np.int64))])
    net, info = load_network(outcome.adapter_dir, kind="cta")
    assert info["augmentation"] == {"hflip": False} and net.trained_augmentation == {"hflip": False}
    assert outcome.network.trained_augmentation == {"hflip": False}
    assert flip_signs and mirrored(flip_signs) == 0  # SimCLR stage, alignment and CTA validation alike
