"""The `TTAMethod` base class and the method registry.

The base class owns the update loop (steps per batch, episodic reset, saving and
restoring the source state). A method supplies only what is specific to it:

- its `Config` dataclass (a subclass of `MethodConfig`, the one place for its
  defaults) with `validate()`: its own value rules, after `super().validate()`,
  raising a ValueError that names the method and the field. `make_config`,
  `build_method` and the constructor call it, so a bad value is refused before
  anything is built (and an experiment refuses it before its first row runs);

- `configure_model()`: train/eval modes, which BN layers use batch statistics,
  which parameters require gradients;
- `init_extra_state()` with `extra_state()` / `load_extra_state()`: state of its
  own (an EMA teacher, a moving average) that `reset()` must restore;
- `collect_params()`: the parameters (or param groups) it adapts;
- `loss(x, logits)`: its unsupervised objective (return None for no update);
- optionally `forward_and_adapt(x)` when one step is more than
  forward -> loss -> backward -> step (SAR's SAM, CoTTA's teacher).

The optimizer is built by `build_optimizer` from the method's config, unless an
`optimizer_factory` is given. A learned optimizer (the MGG) replaces SGD/Adam under
any gradient method either way: `optimizer: mgg` in the config makes the method
declare the context input "mgg" (a trained MGG; the experiment loads it from the
row's `adapter`) and step with it at `lr`, or pass `mgg_optimizer_factory(mgg, lr)`.

Non-finite guard (every method gets it, including those that override
`forward_and_adapt`):

- a test batch with NaN/inf pixels is never adapted on. `on_nonfinite_input`
  chooses what happens: "skip" (default) predicts it without adapting and warns
  once; "error" raises a ValueError;
- every update is a transaction: before it, the adapted parameters (with their
  gradients cleared afterwards), the model's buffers, the optimizer state and the
  method's extra state are copied; if the update leaves a non-finite value in a
  parameter, its gradient or the optimizer state (a NaN/inf loss, an exploding
  gradient), all of them are put back bit for bit and the batch's prediction is
  still returned. The default step also refuses a non-finite loss before
  backpropagating it.

Seams for a method that wraps another (the BN plug-ins, methods/plugin.py) drive
the wrapped method through public hooks, never its private state:
`unguarded_step(x)` (one step without the guard, and whether the step refused its
update) and `gate_updates(gate)` (every parameter update of the method's innermost
optimizer, below SAM, goes through `gate`, which may hold it back, e.g. to
accumulate gradients, or act after it).

`skipped_updates` counts both kinds; evaluation reports it in every Result. The
copy costs one clone of the adapted tensors and the optimizer state per update
(measured: about 1% of a Tent or CoTTA step on the default ResNet-8 at batch 200).

Learning rate and batch size: a method's config states the batch size its
published lr is for (`lr_batch_size`); `build_method(..., batch_size=B)` (the
runners pass the stream's batch size) makes it lr * min(1, B / lr_batch_size),
linear below the published batch as SAR's and EATA's code do, never scaled up
(`scale_lr: false` keeps the lr as given). `method.lr_scaling` records the rule,
the published and the resulting lr for the result's protocol.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

import metatta.methods  # the package, for its late registrations (this module is imported while it initializes)
from metatta.config import build_dataclass
from metatta.learned.optimizer import MGGOptimizer, frozen_mgg
from metatta.methods.guard import CollapseGuard, GuardConfig
from metatta.methods.common import PRECISIONS, autocast_forward

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list], torch.optim.Optimizer]
# gate(params, update): called instead of an optimizer step with the adapted tensors (their
# gradients set) and `update`, which performs the step; the gate decides whether to call it.
UpdateGate = Callable[[list[torch.Tensor], Callable[[], Any]], Any]

_REGISTRY: dict[str, type["TTAMethod"]] = {}

NONFINITE_INPUT_POLICIES = ("skip", "error")
OPTIMIZERS = ("sgd", "adam", "mgg")


@dataclasses.dataclass
class MethodConfig:
    """Hyperparameters shared by every method; subclasses add their own fields."""

    steps: int = 1  # adaptation steps per test batch
    episodic: bool = False  # reset to the source state before every batch
    optimizer: str = "sgd"  # sgd | adam | mgg (a trained MGG, context input "mgg": the learned optimizer)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    on_nonfinite_input: str = "skip"  # skip: predict without adapting, warn once | error: raise
    # NHWC weights and inputs: oneDNN's convolutions (forward and backward) are 1.1-1.6x
    # faster in that layout on CPU (measured: Tent 1864 -> 2106, PALM 362 -> 500,
    # LAW 416 -> 637 img/s, ResNet-8, batch 200, 2 threads). Only 4-d tensors change.
    channels_last: bool = True
    # The model's forward under autocast: "fp32" (default) as is; "bf16" computes convolutions and
    # matrix products in bfloat16 with float32 logits, parameters, gradients and optimizer state.
    # Not bit-identical to fp32 (bf16 keeps 8 bits of mantissa); fast only on CPUs with bf16
    # instructions (AMX / AVX512-BF16: measured 2.06x for PALM on ResNet-8, batch 200, one thread)
    # or on a GPU, slower elsewhere, so never the default.
    precision: str = "fp32"
    # Learning rate and batch size (`scaled_to_batch`): `lr` is the rate published (or tuned) for
    # batches of `lr_batch_size`; at a smaller test batch B it becomes lr * B / lr_batch_size
    # (linear, as SAR's and EATA's code set it below their published batch), never scaled up, so
    # a method at or above its published batch runs with the published lr. None: lr used as is.
    lr_batch_size: int | None = None
    scale_lr: bool = True
    batch_size: int | None = None  # the test batch size; set by build_method(batch_size=...), not by hand
    # RDumb (Press et al., NeurIPS 2023): back to the source state and a fresh optimizer every
    # `reset_every` updates (adapted batches x steps); None: never on a schedule.
    reset_every: int | None = None
    # The label-free collapse guard (methods/guard.py). The default only watches the class marginal
    # and warns (Result.collapse_events counts it); `guard: {action: reset, ...}` resets on collapse;
    # null switches it off.
    guard: GuardConfig | None = dataclasses.field(default_factory=lambda: WATCH)

    # The registered name of the method this config is for (set by `register`), for messages.
    method_name: ClassVar[str] = "method"
    # The fewest adaptation steps per batch that mean something (TTT and CTA: 0, predict unadapted).
    min_steps: ClassVar[int] = 1

    def validate(self) -> None:
        """Refuse values that cannot be meant, naming the method and the field (ValueError).
        A subclass calls `super().validate()` first, then checks its own fields (`refuse`)."""
        if not _is_int(self.steps) or self.steps < self.min_steps:
            self.refuse("steps", f"an integer >= {self.min_steps}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            self.refuse("optimizer", ", ".join(map(repr, OPTIMIZERS[:-1])) + f" or {OPTIMIZERS[-1]!r}")
        for field in ("lr", "weight_decay"):
            value = getattr(self, field)
            if value is not None and not (_is_finite(value) and value >= 0):
                self.refuse(field, "a finite number >= 0")
        if self.momentum is not None and not (_is_finite(self.momentum) and 0 <= self.momentum <= 1):
            self.refuse("momentum", "a number in [0, 1]")
        if self.betas is not None and (len(self.betas) != 2 or not all(_is_finite(b) and 0 <= b < 1
                                                                        for b in self.betas)):
            self.refuse("betas", "two numbers in [0, 1)")
        if self.precision not in PRECISIONS:
            self.refuse("precision", " or ".join(map(repr, PRECISIONS)))
        if self.on_nonfinite_input not in NONFINITE_INPUT_POLICIES:
            self.refuse("on_nonfinite_input", "one of " + ", ".join(map(repr, NONFINITE_INPUT_POLICIES)))
        for field in ("lr_batch_size", "batch_size", "reset_every"):
            value = getattr(self, field)
            if value is not None and not (_is_int(value) and value >= 1):
                self.refuse(field, "an integer >= 1 or null")
        if self.guard is not None:
            if not isinstance(self.guard, GuardConfig):
                self.refuse("guard", "a mapping of guard settings or null")
            self.guard.validate(f"{self.method_name}: config.guard")

    def refuse(self, field: str, rule: str) -> None:
        """Raise the ValueError of a bad value: '<method>: config.<field> must be <rule>, got <value>'."""
        raise ValueError(f"{self.method_name}: config.{field} must be {rule}, got {getattr(self, field)!r}")


# What every method wears unless told otherwise: a warning (and a count in the Result) when its
# predictions fall onto one or two classes for 8 batches running. Warn only: a label-shifted stream can
# legitimately look like that, and nothing is reset without being asked for.
WATCH = GuardConfig(action="warn", min_marginal_entropy=0.15, min_agreement=None, window=8)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def register(name: str):
    """Class decorator: make a method available as `build_method(name, ...)`."""

    def wrap(cls: type[TTAMethod]) -> type[TTAMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        owner = cls.Config.__dict__.get("method_name")
        if cls.Config is MethodConfig or owner not in (None, name):
            # A config names its method in its messages: each method has a Config class of its own.
            raise ValueError(f"method {name!r}: its Config {cls.Config.__name__} is "
                             f"{'the base class' if owner == 'method' else f'the config of method {owner!r}'}; "
                             "give it a subclass of its own")
        cls.Config.method_name = name
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type["TTAMethod"]:
    _import_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def build_method(
    name: str,
    model: nn.Module,
    config: dict[str, Any] | MethodConfig | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    batch_size: int | None = None,
    **context: Any,
) -> "TTAMethod":
    """Build a registered method. `config` may be a dict of overrides of the
    method's defaults; `batch_size` is the test batch size the method will see
    (the runner's stream), which scales its learning rate (`scaled_to_batch`);
    `context` carries method-specific inputs such as `fisher_batches` (EATA's
    Fisher) or `source_stats` (MGTTA)."""
    cls = method_class(name)
    if config is None or isinstance(config, dict):
        config = cls.make_config(config or {})
    else:
        config.validate()
    scaling = None
    if batch_size is not None:
        config, scaling = scaled_to_batch(config, batch_size, where=name)
    method = cls(model, config, optimizer_factory=optimizer_factory, **context)
    method.lr_scaling = scaling
    return method


def scaled_to_batch(config: MethodConfig, batch_size: int, where: str = "method") -> tuple[MethodConfig, dict]:
    """`config` for test batches of `batch_size`: lr * min(1, batch_size / lr_batch_size) when
    `scale_lr` and `lr_batch_size` are set, with `lr_batch_size` then set to the batch the new lr is
    for, so the returned config is self-consistent (scaling it again changes nothing). Also returns
    the record of what was done, for a result's protocol.

    Before building the method, because methods read `config.lr` in their constructors (MGTTA's
    learned optimizer, PALM's rates). Down only: SAR's code uses lr * B / 32 below batch 32 and the
    published lr above it, and scaling up would change every table at the published batch size.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be an integer >= 1, got {batch_size!r}")
    published, per_batch = config.lr, config.lr_batch_size
    if per_batch is not None and (not isinstance(per_batch, int) or per_batch < 1):
        raise ValueError(f"{where}: config.lr_batch_size must be an integer >= 1 or null, got {per_batch!r}")
    record = {"rule": "lr * min(1, batch_size / lr_batch_size)", "batch_size": batch_size,
              "lr_batch_size": per_batch, "published_lr": published, "factor": 1.0, "lr": published}
    if not config.scale_lr or per_batch is None or published is None:
        record["rule"] = "none (scale_lr false)" if not config.scale_lr else "none (no lr_batch_size)"
        return dataclasses.replace(config, batch_size=batch_size), record
    factor = min(1.0, batch_size / per_batch)
    record.update(factor=factor, lr=published * factor)
    if factor == 1.0:
        return dataclasses.replace(config, batch_size=batch_size), record
    return dataclasses.replace(config, batch_size=batch_size, lr=published * factor, lr_batch_size=batch_size), record


def _import_builtin_methods() -> None:
    # Importing the package registers the baselines; methods that build on other
    # subpackages (mgtta) are imported at the first lookup, because importing them from the
    # package's __init__ would be circular (metatta.learned imports methods.common).
    metatta.methods.import_builtin_methods()


class TTAMethod(nn.Module):
    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Names of extra inputs the method needs from the experiment (e.g. EATA's
    # "fisher_batches"); runners build exactly these and pass them as context.
    context_inputs: ClassVar[tuple[str, ...]] = ()
    # How build_method scaled the lr to the test batch size (`scaled_to_batch`); None: not asked to.
    lr_scaling: dict[str, Any] | None = None

    def __init__(
        self,
        model: nn.Module,
        config: MethodConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        mgg: Any = None,
        **context: Any,
    ):
        super().__init__()
        self._mgg = mgg  # the learned optimizer of `optimizer: mgg`
        if context:
            raise TypeError(f"{type(self).__name__} takes no extra inputs, got {sorted(context)}")
        self.config = self.checked_config(config)
        if self.config.channels_last:
            # Before the method copies anything (teachers, anchors, snapshots), so all share the layout.
            model = model.to(memory_format=torch.channels_last)
        if PRECISIONS[self.config.precision] is not None:
            autocast_forward(model, PRECISIONS[self.config.precision])
        self.model = model
        # The collapse guard's reference is the source model as it is now, before the method configures it.
        self.guard = (CollapseGuard(self.config.guard, source=model, where=f"{self.name} guard")
                      if self.config.guard is not None else None)
        self.collapse_events = 0  # times the guard fired (not reset by reset())
        self.scheduled_resets = 0  # resets by `reset_every` (not reset by reset())
        self._updates_since_reset = 0
        self.skipped_updates = 0  # updates refused by the non-finite guard (not reset by reset())
        self._warned: set[str] = set()
        self._refuse_step = False  # set by a step that found its loss non-finite
        self.configure_model()
        self.init_extra_state()
        params = self.collect_params()
        self.optimizer = None
        if params:
            factory = optimizer_factory or self.build_optimizer
            self.optimizer = factory(params)
        self._source_state = self._snapshot()

    @classmethod
    def checked_config(cls, config: MethodConfig | None) -> MethodConfig:
        """`config` (None: the method's defaults), validated (`MethodConfig.validate`); a constructor
        that reads its config before the base's calls this first."""
        config = config if config is not None else cls.Config()
        config.validate()
        return config

    @classmethod
    def inputs_for(cls, config: MethodConfig) -> tuple[str, ...]:
        """The context inputs a method built from `config` needs (a wrapper: its base's)."""
        if config.optimizer == "mgg" and "mgg" not in cls.context_inputs:
            return (*cls.context_inputs, "mgg")
        return cls.context_inputs

    # ---- what a method specifies -------------------------------------------------
    def configure_model(self) -> None:
        """Put the model in the mode the method adapts in (default: untouched)."""

    def init_extra_state(self) -> None:
        """Create the method's own state (EMA teacher, moving averages) once the model is
        configured; runs before the source snapshot, so `reset()` returns to it."""

    def collect_params(self) -> list:
        """Parameters (or param-group dicts) to adapt; empty for no gradient updates."""
        return []

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Unsupervised loss on a test batch, or None to skip the update."""
        return None

    # ---- the update loop -----------------------------------------------------------
    def in_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A test batch in the model's memory layout (`config.channels_last`)."""
        if self.config.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`forward` (the method's, whatever it overrides), then what every method wears: the
        collapse guard and the `reset_every` schedule, both acting between batches."""
        logits = super().__call__(x, *args, **kwargs)
        if self.guard is not None and self.guard.observe(x, logits):
            self.collapse_events += 1
            if self.guard.config.action == "reset":
                self.reset()
        if self.config.reset_every is not None and self.optimizer is not None and bool(torch.isfinite(x).all()):
            self._updates_since_reset += self.config.steps
            if self._updates_since_reset >= self.config.reset_every:
                self.reset()
                self.scheduled_resets += 1
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_layout(x)
        if self.config.episodic:
            self.reset()
        if self.optimizer is None:
            return self.predict(x)
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)
        for _ in range(max(1, self.config.steps)):
            logits = self._guarded_step(x)
        return logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One adaptation step; returns the logits computed before the update."""
        with torch.enable_grad():
            logits = self.model(x)
            loss = self.loss(x, logits)
            if loss is not None and not bool(torch.isfinite(loss).all()):
                self.refuse_update()
            elif loss is not None and loss.requires_grad:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return logits.detach()

    def refuse_update(self) -> None:
        """Called by a step that finds its loss non-finite: the guard rolls the step back."""
        self._refuse_step = True

    # ---- seams for a method that wraps this one (methods/plugin.py) ---------------------------
    def unguarded_step(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One adaptation step (`forward_and_adapt`) without the non-finite guard's transaction:
        the logits, and whether the step refused its update (`refuse_update`). For a wrapper
        that runs this method's step inside its own guard."""
        self._refuse_step = False
        logits = self.forward_and_adapt(x)
        return logits, self._refuse_step

    def gate_updates(self, gate: UpdateGate) -> None:
        """Route every parameter update of this method through `gate(params, update)` (see
        UpdateGate). The gate sits at the innermost optimizer's `step` (below SAM, for SAR), so it
        sees one update per real step whatever the method's own step does around it."""
        if self.optimizer is None:
            raise ValueError(f"{self.name}: adapts no parameters, so it has no updates to gate")
        optimizer = self.optimizer
        while hasattr(optimizer, "base_optimizer"):  # a wrapper such as SAM
            optimizer = optimizer.base_optimizer
        step = optimizer.step
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return gate(params, lambda: step(*args, **kwargs))

        optimizer.step = gated_step

    # ---- the non-finite guard ------------------------------------------------------------
    def _nonfinite_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.on_nonfinite_input == "error":
            raise ValueError(f"{self.name}: the test batch has non-finite pixels "
                             f"({int((~torch.isfinite(x)).sum())} of {x.numel()} values are NaN or inf)")
        self._count_skip("a test batch has NaN/inf pixels: predicting it without adapting")
        return self.predict(x)

    def _guarded_step(self, x: torch.Tensor) -> torch.Tensor:
        saved = self._capture()
        logits, refused = self.unguarded_step(x)
        if refused or not self._update_is_finite():
            self._rollback(saved)
            self._count_skip("a non-finite loss, gradient or update: the update was undone")
        return logits

    def _adapted_tensors(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _capture(self) -> dict[str, Any]:
        with torch.no_grad():
            return {
                "params": [p.detach().clone() for p in self._adapted_tensors()],
                "buffers": [b.detach().clone() for b in self.model.buffers()],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "extra": copy.deepcopy(self.extra_state()),
            }

    def _rollback(self, saved: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, value in zip(self._adapted_tensors(), saved["params"]):
                p.copy_(value)
                p.grad = None
            for b, value in zip(self.model.buffers(), saved["buffers"]):
                b.copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.load_extra_state(saved["extra"])

    def _update_is_finite(self) -> bool:
        tensors = []
        for p in self._adapted_tensors():
            tensors.append(p.detach())
            if p.grad is not None:
                tensors.append(p.grad)
        tensors += [v for state in self.optimizer.state.values() if isinstance(state, dict)
                    for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not tensors:
            return True
        return bool(torch.isfinite(torch.cat([t.reshape(-1).to(tensors[0].device) for t in tensors])).all())

    def _count_skip(self, why: str) -> None:
        self.skipped_updates += 1
        if why not in self._warned:
            self._warned.add(why)
            log.warning("%s: %s (warned once; Result.skipped_updates counts them)", self.name, why)

    def build_optimizer(self, params: list) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        if cfg.optimizer == "mgg":
            if self._mgg is None:
                raise ValueError(f"{self.name}: optimizer 'mgg' needs a trained MGG (context input mgg=, "
                                 "or the experiment row's `adapter: models:/mgg@champion`)")
            return MGGOptimizer(params, frozen_mgg(self._mgg, _params_device(params)), lr=cfg.lr)
        raise ValueError(f"{self.name}: unknown optimizer {cfg.optimizer!r}; use 'sgd', 'adam' or 'mgg'")

    # ---- state -----------------------------------------------------------------------
    def schedule_state(self) -> dict[str, Any]:
        """The counters and the guard's windows: what a resumed run needs besides the weights,
        the optimizer and the extra state (`metatta.lifelong` saves it with them)."""
        return {"updates_since_reset": self._updates_since_reset, "collapse_events": self.collapse_events,
                "scheduled_resets": self.scheduled_resets, "skipped_updates": self.skipped_updates,
                "guard": self.guard.state() if self.guard is not None else None}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        self._updates_since_reset = state["updates_since_reset"]
        self.collapse_events, self.scheduled_resets = state["collapse_events"], state["scheduled_resets"]
        self.skipped_updates = state["skipped_updates"]
        if self.guard is not None and state["guard"] is not None:
            self.guard.load_state(state["guard"])

    def reset(self) -> None:
        """Return the model (and the method's own state) to the source state."""
        self._restore(self._source_state)
        self._updates_since_reset = 0

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
            "extra": copy.deepcopy(self.extra_state()),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.model.load_state_dict(snapshot["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(snapshot["optimizer"])
        self.load_extra_state(copy.deepcopy(snapshot["extra"]))

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond model and optimizer (EMA teachers, counters) to reset."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            raise NotImplementedError(f"{type(self).__name__} keeps extra state but cannot restore it")

    @classmethod
    def make_config(cls, overrides: dict[str, Any]) -> MethodConfig:
        """The method's defaults with `overrides`, type-checked and validated (`MethodConfig.validate`)."""
        config = build_dataclass(cls.Config, overrides, where=f"method {cls.name}")
        config.validate()
        return config

    def adapted_parameter_count(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def _params_device(params: list) -> torch.device:
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    return first.device
