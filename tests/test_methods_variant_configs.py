"""The variant settings files of the added methods (configs/methods/<method>_<variant>.yaml) are
valid overrides of their method's config dataclass."""
from pathlib import Path

import pytest

from metatta.config import load_config
from metatta.methods import method_class

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
VARIANTS = {"deyo_vit": "deyo", "tent_vit": "tent", "sar_vit": "sar", "eata_vit": "eata", "cotta_vit": "cotta",
            "mgtta_vit": "mgtta", "deyo_cifar": "deyo", "rpl_imagenet": "rpl", "memo_imagenet": "memo",
            "bn_alpha": "bn", "bn_ema": "bn", "eta_rdumb_cifar": "eta", "eta_rdumb_imagenet": "eta", "eta_rdumb": "eta", "adacontrast_imagenet": "adacontrast"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_file_is_a_valid_override(variant):
    cls = method_class(VARIANTS[variant])
    overrides = load_config(CONFIG_DIR / f"{variant}.yaml")
    config = cls.make_config(overrides)
    config.validate()
    assert config != cls.Config() and all(getattr(config, k) == getattr(cls.make_config({k: v}), k)
                                          for k, v in overrides.items())
