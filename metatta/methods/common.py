"""Pieces many methods share: normalization-layer handling and entropy."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from metatta.losses import max_entropy, softmax_entropy  # noqa: F401  (re-exported: methods import them from here)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES = BN_TYPES + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def use_batch_statistics(model: nn.Module) -> None:
    """Make every BN layer normalize with the statistics of the current batch,
    in train and eval mode alike.

    Dropping the running buffers matters: with `track_running_stats=False` but
    the buffers still present, eval-mode BN silently uses the source statistics.
    """
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def require_batchnorm(model: nn.Module, method: str) -> None:
    """Methods that adapt through BatchNorm statistics (BN, NanoAdapt, DELTA) refuse a model without
    BatchNorm layers (a LayerNorm ViT) with one error naming the method and the model."""
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        norms = sorted({type(m).__name__ for _, m in norm_layers(model)}) or ["no normalization layers"]
        raise ValueError(f"{method}: needs a model with BatchNorm layers; {type(model).__name__} has none "
                         f"({', '.join(norms)})")


def freeze_all(model: nn.Module) -> None:
    model.requires_grad_(False)


def norm_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """Enable and return the affine weight/bias of every normalization layer."""
    params = []
    for _, m in norm_layers(model):
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    return params


def adaptable_norm_params(model: nn.Module, method: str) -> list[nn.Parameter]:
    """`norm_affine_params`, refusing a model that has none (nothing would adapt)."""
    params = norm_affine_params(model)
    if not params:
        raise ValueError(f"{method}: the model has no normalization layer with affine parameters to adapt")
    return params


def configure_norm_adaptation(model: nn.Module) -> list[nn.Parameter]:
    """Tent's recipe: freeze everything, BN on batch statistics, adapt norm affines."""
    model.eval()
    freeze_all(model)
    use_batch_statistics(model)
    return norm_affine_params(model)


def classifier_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The network's linear classifier: the module called `name`, or (None) its last `nn.Linear`
    in module order (`fc` of the ResNets and WideResNets, `vit.head` of the ViT)."""
    modules = dict(model.named_modules())
    if name is not None:
        if not isinstance(modules.get(name), nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"classifier {name!r} is not an nn.Linear of {type(model).__name__}; its linear "
                             f"layers: {linears}")
        return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; name one with `classifier`")
    return linears[-1]


def features_and_logits(model: nn.Module, classifier: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the classifier's input, the model's output) for `x`, from one forward of the whole model
    (so hooks on the model see it); the classifier must take the (B, D) features."""
    captured: list[torch.Tensor] = []
    handle = classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].dim() != 2:
        raise ValueError(f"the classifier {type(classifier).__name__} must run once per forward on (B, D) "
                         f"features; got {[tuple(z.shape) for z in captured]}")
    return captured[0], logits


def step_or_refuse(method, loss: torch.Tensor) -> bool:
    """One optimizer step of `method` (a TTAMethod) on a scalar `loss`, or, when the loss is
    non-finite, `method.refuse_update()` so the guard rolls the step back. True when it stepped."""
    if not bool(torch.isfinite(loss)):
        method.refuse_update()
        return False
    method.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.optimizer.step()
    return True


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, in place, for each (target, source)
    pair: the mean teacher of CoTTA and RMT, ROID's ensembling with the source weights."""
    for target, source in pairs:
        target.mul_(momentum).add_(source.detach().to(target.device), alpha=1.0 - momentum)


# `MethodConfig.precision`: the dtype the model's forward computes in under autocast (None: as is).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class AutocastForward:
    """Forward hooks that run a module's forward under `torch.autocast(dtype)` and return its
    floating outputs in float32, so losses, entropies and optimizer state stay float32 (the
    parameters and their gradients are float32 throughout; autocast casts copies).

    The hooks hold no reference to the module, so a deep copy of it (a teacher, the collapse
    guard's reference) gets hooks of its own that behave the same."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._active: list[torch.autocast] = []  # one entry per forward in progress (nested calls)

    def enter(self, module: nn.Module, args: tuple) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        context = torch.autocast(first.device.type if first is not None else "cpu", dtype=self.dtype)
        context.__enter__()
        self._active.append(context)

    def leave(self, module: nn.Module, args: tuple, output):
        self._active.pop().__exit__(None, None, None)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.float()
        return output


def autocast_forward(model: nn.Module, dtype: torch.dtype) -> AutocastForward:
    """Make `model`'s forward run under autocast to `dtype` with float32 outputs (in place)."""
    hooks = AutocastForward(dtype)
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.leave, always_call=True)  # leaves autocast even when forward raises
    return hooks
