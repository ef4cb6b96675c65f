"""Checks every method test file runs: the state a method's `reset()` must restore, a NaN batch
skipped, adapted parameter names, a tiny LayerNorm ViT."""
from __future__ import annotations

import copy

import torch
from torch import nn

from metatta.methods import TTAMethod
from metatta.models.vit import ViTClassifier
from test_methods import NUM_CLASSES, assert_same_state


def method_state(method: TTAMethod) -> dict:
    """Everything `reset()` restores: model, optimizer, the method's own state."""
    return copy.deepcopy({
        "model": method.model.state_dict(),
        "optimizer": method.optimizer.state_dict() if method.optimizer else None,
        "extra": method.extra_state(),
    })


def adapted_names(method: TTAMethod) -> set[str]:
    """Names (in method.model) of the parameters the optimizer updates."""
    adapted = {id(p) for g in method.optimizer.param_groups for p in g["params"]} if method.optimizer else set()
    return {n for n, p in method.model.named_parameters() if id(p) in adapted}


def assert_reset_restores_source(method: TTAMethod, inputs: list[torch.Tensor]) -> None:
    """Adapting on `inputs` changes the state; reset() returns it bit for bit, and the next
    output is that of a method that never adapted."""
    fresh = copy.deepcopy(method)
    source = method_state(method)
    for x in inputs:
        method(x)
    assert not _same(method_state(method), source), "adapting changed nothing; the test proves nothing"
    method.reset()
    assert_same_state(method_state(method), source, "after reset")
    torch.manual_seed(11)
    after = method(inputs[0])
    torch.manual_seed(11)
    torch.testing.assert_close(after, fresh(inputs[0]), rtol=0, atol=0)


def assert_nan_batch_skipped(method: TTAMethod, inputs: list[torch.Tensor]) -> None:
    """After adapting on `inputs[0]`, a batch with a NaN image changes no state and counts one
    skipped update; `inputs[2]` then still gives finite outputs. Needs three batches."""
    method(inputs[0])
    before = method_state(method)
    x = inputs[1].clone()
    x[5, 1] = float("nan")
    method(x)
    assert_same_state(method_state(method), before)
    assert method.skipped_updates == 1
    assert torch.isfinite(method(inputs[2])).all()


def _same(a, b) -> bool:
    try:
        assert_same_state(a, b)
    except AssertionError:
        return False
    return True


def tiny_vit(seed: int = 0) -> nn.Module:
    """A 4-block LayerNorm ViT on 3x16x16 inputs, 10 classes (timm blocks: norm1, norm2; final norm)."""
    torch.manual_seed(seed)
    model = ViTClassifier(num_classes=NUM_CLASSES, in_channels=3, img_size=16, patch_size=4, embed_dim=32, depth=4,
                          num_heads=2)
    with torch.no_grad():
        model.vit.head.weight.mul_(20.0)  # confident enough for entropy filters
    return model.eval()
