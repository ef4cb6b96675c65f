"""The method contract (metatta/methods/base.py): one validation hook on the config
(`MethodConfig.validate`, called by make_config, build_method and the constructor), the
public seams a wrapping method uses (`unguarded_step`, `gate_updates`), and the defaults
in one place (configs/methods/*.yaml list only what differs from the dataclass)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from metatta.config import build_dataclass
from metatta.methods import available_methods, build_method, method_class
from metatta.methods.base import TTAMethod, register

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "methods"


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


# ---- one validation hook --------------------------------------------------------------------
@pytest.mark.parametrize("name", available_methods())
@pytest.mark.parametrize("field, value, rule", [
    ("steps", -1, "an integer >= "), ("lr", -1e-3, "a finite number >= 0"), ("lr", math.nan, "a finite number"),
    ("lr", math.inf, "a finite number"), ("weight_decay", -0.1, "a finite number >= 0"),
    ("momentum", -0.5, r"a number in \[0, 1\]"), ("betas", (0.9, 1.5), r"two numbers in \[0, 1\)"),
    ("optimizer", "sgdd", "'sgd', 'adam' or 'mgg'"), ("on_nonfinite_input", "ignore", "one of"),
    ("lr_batch_size", 0, "an integer >= 1 or null"),
])
def test_every_method_refuses_nonsense_naming_itself_and_the_field(name, field, value, rule):
    with pytest.raises(ValueError, match=rf"^{name}: config\.{field} must be {rule}"):
        method_class(name).make_config({field: value})


def test_steps_below_one_is_refused_not_run_as_one():
    with pytest.raises(ValueError, match=r"tent: config\.steps must be an integer >= 1, got -1"):
        build_method("tent", tiny_net(), {"steps": -1})
    with pytest.raises(ValueError, match=r"tent: config\.steps must be an integer >= 1, got 0"):
        build_method("tent", tiny_net(), {"steps": 0})
    # TTT and CTA predict without adapting at steps 0; below that is nonsense for them too
    assert method_class("ttt").make_config({"steps": 0}).steps == 0
    with pytest.raises(ValueError, match=r"ttt: config\.steps must be an integer >= 0, got -1"):
        method_class("ttt").make_config({"steps": -1})


def test_a_config_object_is_validated_by_build_method_and_the_constructor():
    cls = method_class("tent")
    bad = dataclasses.replace(cls.Config(), lr=-1.0)  # made by hand: no make_config on the way
    with pytest.raises(ValueError, match=r"tent: config\.lr must be a finite number >= 0, got -1\.0"):
        build_method("tent", tiny_net(), bad)
    with pytest.raises(ValueError, match=r"tent: config\.lr"):
        cls(tiny_net(), bad)


def test_a_plugin_validates_its_base_config_naming_the_base():
    with pytest.raises(ValueError, match=r"^eata: config\.lr must be a finite number >= 0"):
        method_class("nanoadapt").make_config({"base": "eata", "base_config": {"lr": -1.0}})
    with pytest.raises(ValueError, match=r"^delta: config\.steps must be an integer >= 1"):
        method_class("delta").make_config({"steps": 0})
    with pytest.raises(ValueError, match="plug-ins do not nest"):
        method_class("nanoadapt").make_config({"base": "delta"})


def test_every_method_config_class_is_its_own():
    configs = [method_class(n).Config for n in available_methods()]
    assert len(set(configs)) == len(configs)
    assert all(method_class(n).Config.method_name == n for n in available_methods())
    with pytest.raises(ValueError, match="give it a subclass of its own"):
        @register("contract_test_shares_tent_config")
        class SharesTentConfig(TTAMethod):
            Config = method_class("tent").Config


# ---- seams for wrapping methods ----------------------------------------------------------------
def test_gate_updates_can_hold_back_and_follow_every_update():
    method = build_method("tent", tiny_net(), {"lr": 0.1, "channels_last": False})
    seen = []

    def hold_back_every_other(params, update):
        seen.append([p.grad is not None for p in params])
        return update() if len(seen) % 2 == 0 else None

    method.gate_updates(hold_back_every_other)
    before = [p.detach().clone() for p in method.model.parameters()]
    method(torch.rand(8, 3, 8, 8))  # first update: held back
    assert all(torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
    method(torch.rand(8, 3, 8, 8))  # second: made
    assert not all(torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
    assert seen == [[True] * 2, [True] * 2]  # the BN affine weight and bias, with their gradients


def test_unguarded_step_reports_a_refused_update():
    method = build_method("tent", tiny_net(), {"channels_last": False})
    logits, refused = method.unguarded_step(torch.rand(4, 3, 8, 8))
    assert logits.shape == (4, 3) and not refused
    method.loss = lambda x, logits: logits.sum() * math.nan  # a non-finite loss: the step refuses it
    _, refused = method.unguarded_step(torch.rand(4, 3, 8, 8))
    assert refused


def test_plugins_use_the_public_seams_only():
    source = (ROOT / "metatta" / "methods" / "plugin.py").read_text()
    assert "_refuse_step" not in source and ".step =" not in source


# ---- defaults in one place ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_method_yaml_lists_only_what_differs_from_the_dataclass(path):
    cls = method_class(path.stem.split("_")[0]).Config
    values = yaml.safe_load(path.read_text()) or {}
    config, default = build_dataclass(cls, values, where=path.name), cls()
    config.validate()
    repeated = sorted(k for k in values if getattr(config, k) == getattr(default, k))
    assert not repeated, f"{path.name} repeats the defaults of {cls.__name__}: {repeated}"
