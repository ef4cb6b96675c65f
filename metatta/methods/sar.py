"""SAR: sharpness-aware and reliable entropy minimization (Niu et al., ICLR 2023;
code: mr-eggplant/SAR, sar.py, sam.py, main.py).

One step per test batch, as in the authors' `forward_and_adapt_sar`:

1. forward; reliable samples have entropy < E0 = 0.4 * ln C; backward their mean
   entropy; SAM's first step moves the weights to w + e(w), e = rho g / ||g||;
2. forward again at w + e(w); keep the samples of step 1 whose entropy is still
   < E0; backward their mean entropy; SAM's second step returns to w and lets the
   base optimizer update with these gradients;
3. the moving average of that second loss, ema <- 0.9 ema + 0.1 loss, is the
   recovery signal: when ema < 0.2 the model (and optimizer) is reset to the
   source. In their code the EMA value survives the recovery (`self.ema = ema`
   runs after `reset()`); that is the default here, `clear_ema_on_recovery: true`
   clears it too.

The returned logits are those of the first forward (before the update).
Deviation: when no sample is reliable (in step 1 or step 2) there is no update
here; their code still calls the base optimizer with zero gradients (which only
moves the weights through SGD momentum).

Adapted: affine weight and bias of the normalization layers except the 'top
layers'. Their code skips `layer4` of ResNet-50 and `blocks.9`-`blocks.11` plus
the final `norm` of ViT-B/16. `excluded_modules: null` (default) carries that
rule over to any network (`top_layers`): the last quarter (at least one) of its
main stack of stages/blocks, plus the norm layers placed after that stack; on
ResNet-50 and ViT-B/16 this is exactly their choice, on this project's
networks it is the last stage of the ResNets, `block3` and the final `bn1` of
the WideResNets, the last 2 of 6 blocks and the final norm of the small ViT.
An explicit list names modules instead (a name matches the module itself and
everything below it: `layer4` matches `layer4.0.bn1`, not `layer40` nor
`net.layer4`); `[]` adapts every norm layer.

SAM wraps whatever base optimizer `optimizer_factory` builds (default SGD,
momentum 0.9). Defaults are their ResNet settings (main.py): lr 0.00025 for
batch >= 32 (2 * 0.00025 * B / 64 below; ViT: 0.001 * B / 64), rho 0.05. SAR has
no CIFAR experiments.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, register
from metatta.methods.common import NORM_TYPES, freeze_all, norm_layers, softmax_entropy, use_batch_statistics
from metatta.methods.sam import SAM

log = logging.getLogger(__name__)

# What their collect_params skips on ResNet-50 and ViT-B/16; `top_layers` finds these there.
AUTHORS_EXCLUDED_MODULES = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm")


@dataclasses.dataclass
class SARConfig(MethodConfig):
    optimizer: str = "sgd"
    lr: float = 0.00025  # their ResNet setting for batch >= 32
    lr_batch_size: int | None = 32  # their code: lr * B / 32 below batch 32, lr above
    momentum: float = 0.9
    rho: float = 0.05  # SAM neighbourhood radius
    adaptive: bool = False  # ASAM (their code: False)
    entropy_factor: float = 0.4  # E0 = entropy_factor * ln(num_classes)
    reset_threshold: float = 0.2  # e_m: recover when the EMA of the loss drops below it
    ema_momentum: float = 0.9  # ema <- ema_momentum * ema + (1 - ema_momentum) * loss
    clear_ema_on_recovery: bool = False  # their code keeps the EMA through a recovery
    # Norm layers not adapted: their collect_params skips the top layers (ResNet-50 layer4; ViT-B/16
    # blocks 9-11 and the final norm). None: that rule for any network (`top_layers`: the last quarter
    # of the stages/blocks and the norm after them); or module names, e.g. [stages.2]; []: every norm layer.
    excluded_modules: tuple[str, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if not self.rho >= 0:
            self.refuse("rho", ">= 0")


def is_excluded(module_name: str, excluded: Sequence[str]) -> bool:
    return any(module_name == e or module_name.startswith(e + ".") for e in excluded)


def norm_affine_params_outside(model: nn.Module, excluded: Sequence[str],
                               where: str) -> tuple[list[nn.Parameter], list[str]]:
    """Enable and return the affine weight/bias of every normalization layer not inside an
    `excluded` module (SAR's and DeYO's parameters), with their names; refuses to return none."""
    params, names = [], []
    for module_name, module in norm_layers(model):
        if is_excluded(module_name, excluded):
            continue
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
                params.append(p)
                names.append(f"{module_name}.{pname}")
    if not params:
        raise ValueError(f"{where}: no normalization affine parameters left to adapt (excluded_modules={excluded})")
    return params, names


def top_layers(model: nn.Module) -> list[str]:
    """SAR's top layers of `model`: the last ceil(K/4) of the K stages/blocks of its
    shallowest stack (a Sequential/ModuleList child named stages/blocks/layers, or
    children named layer1..K, block1..K, stage1..K), plus norm layers registered after
    the stack in the same parent. Empty when no stack is found."""
    for parent_name, parent in model.named_modules():
        stack = _stage_stack(parent)
        if stack is None:
            continue
        stage_names, last_child = stack
        top = stage_names[-math.ceil(len(stage_names) / 4):]
        after_stack = False
        for child_name, child in parent.named_children():
            if after_stack and isinstance(child, NORM_TYPES):
                top.append(child_name)
            after_stack = after_stack or child_name == last_child
        return [f"{parent_name}.{n}" if parent_name else n for n in top]
    return []


def _stage_stack(parent: nn.Module) -> tuple[list[str], str] | None:
    children = dict(parent.named_children())
    for name in ("stages", "blocks", "layers"):
        stack = children.get(name)
        if isinstance(stack, (nn.Sequential, nn.ModuleList)) and len(stack) > 1:
            return [f"{name}.{child}" for child, _ in stack.named_children()], name
    for stem in ("layer", "block", "stage"):
        numbered = sorted((int(n[len(stem):]), n) for n in children if n[len(stem):].isdigit() and n.startswith(stem))
        if len(numbered) > 1:
            return [n for _, n in numbered], numbered[-1][1]
    return None


@register("sar")
class SAR(TTAMethod):
    Config = SARConfig

    def __init__(
        self,
        model: nn.Module,
        config: SARConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)

        def sam_factory(params: list) -> SAM:
            # Build lazily: the default base optimizer needs self.config, set by the base __init__.
            base = (optimizer_factory or self.build_optimizer)(params)
            return SAM(base, rho=config.rho, adaptive=config.adaptive)

        super().__init__(model, config, optimizer_factory=sam_factory, **context)
        self.recoveries = 0  # diagnostic: resets triggered by the EMA (not reset by reset())

    # ---- what SAR specifies ----------------------------------------------------------
    def configure_model(self) -> None:
        self.model.eval()
        freeze_all(self.model)
        use_batch_statistics(self.model)

    def init_extra_state(self) -> None:
        self.ema: float | None = None

    def excluded_modules(self) -> list[str]:
        if self.config.excluded_modules is not None:
            return list(self.config.excluded_modules)
        top = top_layers(self.model)
        if not top:
            log.warning("sar: found no stack of stages/blocks in %s, adapting every norm layer; "
                        "set excluded_modules to exclude its top layers", type(self.model).__name__)
        return top

    def collect_params(self) -> list:
        excluded = self.excluded_modules()
        params, names = norm_affine_params_outside(self.model, excluded, "sar")
        log.info("sar: excluding %s; adapting %d tensors", excluded, len(names))
        return params

    def entropy_margin(self, num_classes: int) -> float:
        return self.config.entropy_factor * math.log(num_classes)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        sam: SAM = self.optimizer
        with torch.enable_grad():
            sam.zero_grad(set_to_none=True)
            logits = self.model(x)
            margin = self.entropy_margin(logits.shape[1])
            entropy = softmax_entropy(logits)
            reliable = entropy < margin
            if bool(reliable.any()):
                entropy[reliable].mean(0).backward()
                sam.first_step(zero_grad=True)
                entropy2 = softmax_entropy(self.model(x))[reliable]
                still_reliable = entropy2 < margin
                if bool(still_reliable.any()):
                    loss2 = entropy2[still_reliable].mean(0)
                    self._update_ema(loss2.item())
                    loss2.backward()
                    sam.second_step(zero_grad=True)
                else:
                    sam.unperturb()
                    sam.zero_grad(set_to_none=True)
        if self.ema is not None and self.ema < self.config.reset_threshold:
            self.recover()
        return logits.detach()

    def _update_ema(self, value: float) -> None:
        m = self.config.ema_momentum
        self.ema = value if self.ema is None else m * self.ema + (1 - m) * value

    def recover(self) -> None:
        """Model recovery: back to the source weights and optimizer state."""
        ema = self.ema
        log.info("sar: EMA of the loss %.4f < %.2f, resetting the model to the source", ema,
                 self.config.reset_threshold)
        self.reset()
        self.recoveries += 1
        if not self.config.clear_ema_on_recovery:
            self.ema = ema

    # ---- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ema = state["ema"]
