"""The non-finite guard of `TTAMethod`: a NaN batch or a NaN/inf loss never reaches the
model. Runs over every registered method, so a new method is checked the day it lands."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from metatta.evaluation import Result, evaluate
from metatta.learned.mgg import MGG
from metatta.methods import available_methods, build_method, method_class
from test_methods import FAST, TinyBNNet, assert_same_state, batches, fisher_batches

NO_UPDATES = {"source", "bn"}


def _context(name: str) -> dict:
    builders = {"fisher_batches": fisher_batches, "mgg": MGG, "source_stats": lambda: None,
                "source_batches": lambda: [(torch.cat(fisher_batches(2)), torch.arange(16) % 10)],
                "cta_model": lambda: None, "ttt_model": lambda: None}  # None: CTA/TTT wrap the given model
    inputs = method_class(name).context_inputs
    unknown = set(inputs) - set(builders)
    assert not unknown, f"teach this test to build {name}'s context inputs {sorted(unknown)}"
    return {key: builders[key]() for key in inputs}


def _build(name: str, **overrides):
    return build_method(name, TinyBNNet(), {**FAST.get(name, {}), **overrides}, **_context(name))


def _state(method) -> dict:
    return copy.deepcopy({
        "model": method.model.state_dict(),
        "optimizer": method.optimizer.state_dict() if method.optimizer else None,
        "extra": method.extra_state(),
    })


def _warmed_pair(name: str):
    """Two identical methods that have adapted on the same two batches (so the optimizer
    and the method's own state are not at their initial values)."""
    pair = []
    for _ in range(2):
        method = _build(name)
        torch.manual_seed(0)
        for x in batches(2, seed=3):
            method(x)
        pair.append(method)
    return pair


def _next_clean_output(method) -> torch.Tensor:
    torch.manual_seed(1)  # CoTTA's augmentation and restore draw random numbers
    return method(batches(1, seed=5)[0])


@pytest.mark.parametrize("name", available_methods())
def test_an_all_nan_batch_leaves_the_method_bit_identical(name):
    method, twin = _warmed_pair(name)
    before = _state(method)
    nan_batch = torch.full((16, 3, 16, 16), float("nan"))
    logits = method(nan_batch)
    assert logits.shape == (16, 10)
    assert_same_state(_state(method), before, name)
    assert method.skipped_updates == (0 if name in NO_UPDATES else 1)
    torch.testing.assert_close(_next_clean_output(method), _next_clean_output(twin), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(set(available_methods()) - NO_UPDATES))
def test_an_infinite_loss_step_is_undone(name):
    method, twin = _warmed_pair(name)
    before = _state(method)
    # Infinite logits make every loss (entropy, KL, cross-entropy) and gradient NaN.
    hook = method.model.register_forward_hook(lambda module, inputs, out: out * float("inf"))
    method(batches(1, seed=4)[0])
    hook.remove()
    assert_same_state(_state(method), before, name)
    assert all(torch.isfinite(p).all() for p in method.model.parameters())
    torch.testing.assert_close(_next_clean_output(method), _next_clean_output(twin), rtol=0, atol=0)


def test_tent_counts_a_refused_loss_and_warns_once(caplog):
    method = _build("tent")
    hook = method.model.register_forward_hook(lambda module, inputs, out: out * float("inf"))
    with caplog.at_level(logging.WARNING, logger="metatta.methods.base"):
        for x in batches(3):
            method(x)
    hook.remove()
    assert method.skipped_updates == 3
    assert len([r for r in caplog.records if "non-finite loss" in r.message]) == 1


@pytest.mark.parametrize("name", ["tent", "sar", "cotta"])
def test_a_finite_loss_with_an_infinite_gradient_is_undone(name):
    method = _build(name)
    before = _state(method)
    weight = method.model.layer1[1].weight
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    method(batches(1)[0])
    hook.remove()
    assert_same_state(_state(method), before, name)
    # SAR's own filter already drops it: NaN entropies at the perturbed point are not reliable.
    assert method.skipped_updates == (0 if name == "sar" else 1)


def test_error_policy_refuses_a_nan_batch_with_a_clear_message():
    method = _build("tent", on_nonfinite_input="error")
    x = batches(1)[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tent: the test batch has non-finite pixels \(1 of"):
        method(x)


def test_unknown_policy_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="config.on_nonfinite_input"):
        _build("tent", on_nonfinite_input="ignore")


class _ListStream:
    setting = "continual"
    resets_per_domain = False

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def test_result_reports_skipped_updates_and_reads_old_results():
    method = _build("tent")
    clean = batches(2)
    nan_batch = torch.full_like(clean[0], float("nan"))
    y = torch.zeros(16, dtype=torch.long)
    stream = _ListStream([(clean[0], y, "a"), (nan_batch, y, "a"), (clean[1], y, "a")])
    result = evaluate(method, stream, progress=False)
    assert result.skipped_updates == 1
    old = result.to_dict()
    del old["skipped_updates"]  # results written before the guard existed
    assert Result.from_dict(old).skipped_updates == 0
