"""RDumb is ETA wearing `reset_every: 1000` (configs/methods/eta_rdumb.yaml): its settings file,
a full reset to the source every N updates, bit for bit; non-finite batches are not updates."""
from __future__ import annotations

from pathlib import Path

import torch

from metatta.config import load_config
from metatta.methods import build_method
from method_checks import adapted_names, method_state
from test_methods import TinyBNNet, assert_same_state, batches

RDUMB = Path(__file__).resolve().parents[1] / "configs" / "methods" / "eta_rdumb.yaml"


def test_the_settings_file_is_eta_reset_every_1000_updates():
    method = build_method("eta", TinyBNNet(), load_config(RDUMB))
    assert method.config.reset_every == 1000 and method.config.use_fisher is False
    assert adapted_names(method) == {"layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}


def test_resets_to_the_source_every_reset_every_updates_bit_for_bit():
    method = build_method("eta", TinyBNNet(), {"lr": 0.05, "reset_every": 3})
    source = method_state(method)
    xs = batches(3)
    method(xs[0])
    method(xs[1])
    assert method.scheduled_resets == 0
    assert not torch.equal(method.model.layer1[1].weight, source["model"]["layer1.1.weight"])
    method(xs[2])  # the third update ends with the reset
    assert method.scheduled_resets == 1
    assert_same_state(method_state(method), source)


def test_a_nan_batch_is_not_an_update_and_leaves_it_finite():
    method = build_method("eta", TinyBNNet(), {"lr": 0.05, "reset_every": 2})
    method(batches(1)[0])
    before = method_state(method)
    method(torch.full((16, 3, 16, 16), float("nan")))
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1 and method.scheduled_resets == 0
