"""RDumb (metatta.methods.rdumb): ETA's parameters, a full reset to the source every
`reset_every` steps, bit for bit; non-finite batches."""
from __future__ import annotations

import torch

from metatta.methods import build_method, method_class
from method_checks import adapted_names, assert_reset_restores_source, method_state
from test_methods import TinyBNNet, assert_same_state, batches


def test_defaults_and_parameters():
    assert method_class("rdumb").Config().reset_every == 1000
    assert method_class("rdumb").Config().use_fisher is False
    assert adapted_names(build_method("rdumb", TinyBNNet())) == {
        "layer1.1.weight", "layer1.1.bias", "layer2.1.weight", "layer2.1.bias"}


def test_resets_to_the_source_every_reset_every_steps():
    method = build_method("rdumb", TinyBNNet(), {"lr": 0.05, "reset_every": 3})
    source = method_state(method)
    xs = batches(3)
    method(xs[0])
    method(xs[1])
    assert method.steps_since_reset == 2 and method.resets == 0
    assert not torch.equal(method.model.layer1[1].weight, source["model"]["layer1.1.weight"])
    method(xs[2])  # the third step ends with the reset
    assert method.resets == 1 and method.steps_since_reset == 0
    assert_same_state(method_state(method), source)


def test_reset_restores_the_source_bit_for_bit():
    assert_reset_restores_source(build_method("rdumb", TinyBNNet(), {"lr": 0.05}), batches(2))


def test_a_nan_batch_leaves_it_finite_and_unchanged():
    method = build_method("rdumb", TinyBNNet(), {"lr": 0.05})
    method(batches(1)[0])
    before = method_state(method)
    method(torch.full((16, 3, 16, 16), float("nan")))
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1 and method.steps_since_reset == 1
