"""BN plug-ins: methods that wrap a base method and change where its BatchNorm layers
get their statistics from (NanoAdapt's DBC, DELTA's TBR).

A plug-in (`BNPlugin`) takes any registered base method by name (`base`, with
`base_config`): BN (no gradients), Tent, or any gradient method that adapts through
BN layers (EATA, SAR, MGTTA, PALM, ...), and needs no code specific to any of them:

1. before the base method is built, every BatchNorm layer of the model is turned,
   in place, into the plug-in's layer class (`convert_batchnorms`): a subclass of
   the same `nn.BatchNorm*d` class, so the very Parameter objects, module names and
   `isinstance` checks the base relies on (`norm_affine_params`, SAR's top layers,
   PALM's candidates) are unchanged, and the plug-in's statistics are buffers of the
   model, saved, restored and rolled back with it;
2. the base method is built on that model (`build_method`), with the optimizer
   factory and context it would get on its own;
3. the plug-in drives the base's own step per test batch (`TTAMethod.unguarded_step`:
   the plug-in's guard replaces the base's) and uses two seams every method shares:
   the model's forward (forward hooks: extra views, the batch's first logits) and the
   method's parameter updates (`TTAMethod.gate_updates`, at the innermost optimizer's
   step, below SAM for SAR: accumulation, corrections after an update). The base
   class's non-finite guard wraps the whole of it: the plug-in's buffers are model
   buffers, its other state is extra state.

Per test batch each plug-in layer (`PluginNorm`) runs a session: it keeps the
statistics it had at the start of the batch as the prior of every forward the base
method makes on it (SAR's second pass, PALM's augmented pass), and stores its new
statistics once, from the first forward (the test batch itself). Outside a session
(a NaN batch predicted without adapting, EATA's Fisher pass) it normalizes with its
stored statistics and changes nothing.

Not supported as a base: methods that keep copies of the model (CoTTA's teacher and
anchor, whose layers would run their own sessions), and another plug-in.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from metatta.methods.base import MethodConfig, OptimizerFactory, TTAMethod, build_method, method_class
from metatta.methods.common import require_batchnorm

# Fields of MethodConfig that belong to the plug-in's own loop, not to the base's config.
WRAPPER_FIELDS = ("steps", "episodic", "on_nonfinite_input", "batch_size", "channels_last")
# Optimizer fields a plug-in passes on to its base when set (None: the base's own value).
OPTIMIZER_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "betas")


@dataclasses.dataclass
class PluginConfig(MethodConfig):
    base: str = "tent"  # the wrapped method (any registered name)
    base_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # its config overrides
    # The base's optimizer settings, when set here (None: the base's own; `lr` here is the
    # plug-in's, published for `lr_batch_size` and then given to the base unscaled).
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None

    def validate(self) -> None:
        super().validate()
        base = method_class(self.base)  # unknown names fail with the list of known ones
        owned = sorted(set(self.base_config) & set(WRAPPER_FIELDS))
        if owned:
            raise ValueError(f"{self.method_name}: config.base_config sets {owned}; "
                             f"set them on {self.method_name} itself")
        if issubclass(base.Config, PluginConfig):
            raise ValueError(f"{self.method_name}: config.base {self.base!r} is a BN plug-in itself; "
                             "plug-ins do not nest")
        base.make_config(self.base_overrides())  # the base's own rules, naming the base

    def base_overrides(self) -> dict[str, Any]:
        """The base's config: `base_config`, then the optimizer fields set on the plug-in. A plug-in
        lr was already scaled to the test batch by build_method, so the base takes it unscaled."""
        out = dict(self.base_config)
        out.update({f: getattr(self, f) for f in OPTIMIZER_FIELDS if getattr(self, f) is not None})
        if self.lr is not None:
            out["scale_lr"] = False
        out["channels_last"] = self.channels_last
        return out


# ---- layers -------------------------------------------------------------------------------------
def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel E[x] and E[x^2] over every dimension but the channel one (dim 1)."""
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), (x * x).mean(dims)


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def normalize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, differentiable in every argument
    (F.batch_norm does not propagate gradients into given statistics)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return x * per_channel(scale, x) + per_channel(shift, x)


class PluginNorm:
    """Mixin before `nn.BatchNorm*d`: a BN layer whose statistics a plug-in keeps.

    Subclasses name their statistics buffers (`stat_buffers`), set them up from the
    source statistics (`setup_statistics`) and normalize (`plugin_forward`), reading
    the session's prior with `prior()` and storing new statistics with `store()`.
    `num_real` (set by a plug-in that appends extra rows, e.g. NanoAdapt's views)
    is the number of leading rows that are test samples; the statistics come from them.
    """

    stat_buffers: ClassVar[tuple[str, ...]] = ()

    def init_plugin(self, **options: Any) -> None:
        self.plugin_enabled = True
        self.num_real: int | None = None
        self._prior: tuple[torch.Tensor, ...] | None = None
        self._store_pending = False
        self.setup_statistics(**options)

    def setup_statistics(self, **options: Any) -> None:
        raise NotImplementedError

    def source_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of the source model (zeros and ones when it tracked none)."""
        if self.running_mean is not None and self.running_var is not None:
            return self.running_mean.detach().clone(), self.running_var.detach().clone()
        like = self.weight if self.weight is not None else torch.empty(0)
        return like.new_zeros(self.num_features), like.new_ones(self.num_features)

    # ---- a session per test batch ----------------------------------------------------------
    def begin_session(self, store: bool) -> None:
        self._prior = tuple(getattr(self, n).detach().clone() for n in self.stat_buffers)
        self._store_pending = store

    def end_session(self) -> None:
        self._prior, self._store_pending = None, False

    def prior(self) -> tuple[torch.Tensor, ...]:
        """The statistics to start from: the session's (as at the start of the batch), else the stored ones."""
        return self._prior if self._prior is not None else tuple(getattr(self, n) for n in self.stat_buffers)

    def store(self, *values: torch.Tensor) -> None:
        """Keep `values` as the new statistics, once per session (the batch's first forward)."""
        if not self._store_pending:
            return
        self._store_pending = False
        with torch.no_grad():
            for name, value in zip(self.stat_buffers, values):
                getattr(self, name).copy_(value.detach())

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.num_real is None else x[: self.num_real]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plugin_enabled:
            return super().forward(x)  # type: ignore[misc]
        return self.plugin_forward(x)

    def plugin_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def convert_batchnorms(model: nn.Module, classes: dict[type, type], **options: Any) -> list[PluginNorm]:
    """Turn every BatchNorm layer of `model` into its plug-in class (in place: same object,
    same parameters) and set up its statistics; returns the layers in module order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, PluginNorm):
            raise ValueError(f"BN plug-in: layer {name!r} already belongs to a plug-in ({type(module).__name__}); "
                             "plug-ins do not nest")
        cls = classes.get(type(module))
        if cls is None:
            continue
        module.__class__ = cls
        module.init_plugin(**options)
        layers.append(module)
    return layers


# ---- the wrapper ----------------------------------------------------------------------------------
class BNPlugin(TTAMethod):
    """Base class of the plug-ins: wraps `config.base` (see the module docstring).

    A subclass sets `layer_classes` (BatchNorm class -> plug-in layer class) and its
    `Config` (a PluginConfig with its own `validate`), and
    may override `layer_options`, `base_batch_size`, `expand_batch`, `accumulate`
    (what the optimizer's step does with this batch's gradients; default: step) and
    `after_update` (run right after a parameter update, with the values before it).
    """

    Config: ClassVar[type[PluginConfig]] = PluginConfig
    layer_classes: ClassVar[dict[type, type]] = {}

    def __init__(
        self,
        model: nn.Module,
        config: PluginConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **context: Any,
    ):
        config = self.checked_config(config)
        # The base, built with this channels_last (base_config), moves the model to its layout.
        require_batchnorm(model, self.name)
        layers = convert_batchnorms(model, self.layer_classes, **self.layer_options(config))
        if not layers:
            raise ValueError(f"{self.name}: the model has no BatchNorm layer to take the statistics of")
        base = build_method(config.base, model, config.base_overrides(), optimizer_factory=optimizer_factory,
                            batch_size=self.base_batch_size(config), **context)
        self.norms = layers  # a plain list: the layers are registered under self.model
        self._base_params = [p for g in base.optimizer.param_groups for p in g["params"]] if base.optimizer else []
        super().__init__(base.model, config, optimizer_factory=lambda params: base.optimizer)
        self.base_method = base
        self._new_batch = True
        self._batch: torch.Tensor | None = None
        self._first_logits: torch.Tensor | None = None
        self._in_session = False
        self.model.register_forward_pre_hook(self._before_forward)
        self.model.register_forward_hook(self._after_forward)
        if base.optimizer is not None:
            base.gate_updates(self._gated_update)
        self._source_state = self._snapshot()  # again, now with the base method's own state

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def inputs_for(cls, config: PluginConfig) -> tuple[str, ...]:
        """The wrapped base's inputs (EATA's Fisher batches, MGTTA's MGG), which it is built with."""
        base = method_class(config.base)
        return base.inputs_for(base.make_config(config.base_config))

    def layer_options(self, config: PluginConfig) -> dict[str, Any]:
        return {}

    def base_batch_size(self, config: PluginConfig) -> int | None:
        """The batch size the base's published lr is scaled to (None: not scaled)."""
        return config.batch_size

    @property
    def lr_scaling(self) -> dict[str, Any] | None:  # type: ignore[override]
        """The plug-in's own scaling when its lr is set, else the base's (build_method records both)."""
        own = self.__dict__.get("_lr_scaling")
        if self.config.lr is not None or not hasattr(self, "base_method"):
            return own
        return self.base_method.lr_scaling

    @lr_scaling.setter
    def lr_scaling(self, value: dict[str, Any] | None) -> None:
        self.__dict__["_lr_scaling"] = value

    # ---- what the base specifies, delegated ------------------------------------------------------
    def collect_params(self) -> list:
        return list(self._base_params)

    def adapted_parameter_count(self) -> int:
        return self.base_method.adapted_parameter_count()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._new_batch = True  # the layers store their statistics in this batch's first session
        if self.optimizer is not None:
            return super().forward(x)
        # A base without gradients (BN): the only adaptation is the statistics' update.
        x = self.in_layout(x)
        if self.config.episodic:
            self.reset()
        if not bool(torch.isfinite(x).all()):
            return self._nonfinite_input(x)  # predicted outside a session: statistics untouched
        with self._session(x):
            return self.base_method.predict(x)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The base's own step (not its `forward`: the plug-in's guard and loop replace the base's);
        a step the base refuses (a non-finite loss) is refused here, so the guard rolls it back."""
        with self._session(x):
            logits, refused = self.base_method.unguarded_step(x)
            if refused:
                self.refuse_update()
        return logits

    @contextlib.contextmanager
    def _session(self, x: torch.Tensor):
        """One step on batch `x`: every layer starts a session (storing statistics only on the
        batch's first step), the hooks know the batch, its first logits are recorded."""
        store, self._new_batch = self._new_batch, False
        self._batch, self._first_logits, self._in_session = x, None, True
        for layer in self.norms:
            layer.begin_session(store)
        try:
            yield
        finally:
            for layer in self.norms:
                layer.end_session()
            self._batch, self._in_session = None, False

    # ---- the model's forward --------------------------------------------------------------------------
    def expand_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rows to append to a forward's input (NanoAdapt's views); None: none."""
        return None

    def _before_forward(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self._in_session or not args or not isinstance(args[0], torch.Tensor):
            return None
        extra = self.expand_batch(args[0])
        if extra is None:
            return None
        x = args[0]
        for layer in self.norms:
            layer.num_real = x.shape[0]
        self._expanded = x.shape[0]
        merged = torch.cat([x, extra])
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            merged = merged.contiguous(memory_format=torch.channels_last)
        return (merged,) + tuple(args[1:])

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        expanded = self.__dict__.pop("_expanded", None)
        if expanded is not None:
            for layer in self.norms:
                layer.num_real = None
            output = output[:expanded]
        if self._in_session and self._first_logits is None and isinstance(output, torch.Tensor):
            self._first_logits = output.detach()
        return output if expanded is not None else None

    # ---- the optimizer's update -------------------------------------------------------------------------
    def _gated_update(self, params: list[torch.Tensor], update: Any) -> Any:
        """The base's every parameter update (`TTAMethod.gate_updates`): `accumulate` decides
        whether it happens now, `after_update` follows it."""
        if not self.accumulate(params):
            return None
        before = [p.detach().clone() for p in params]
        out = update()
        self.after_update(params, before)
        return out

    def accumulate(self, params: list[torch.Tensor]) -> bool:
        """Called with this batch's gradients in `params[i].grad`; True: update now."""
        return True

    def after_update(self, params: list[torch.Tensor], before: list[torch.Tensor]) -> None:
        """Called right after the parameters moved from `before` to their current values."""

    # ---- state ----------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        base = self.__dict__.get("_modules", {}).get("base_method")
        return {"base": base.extra_state() if base is not None else {}, **self.plugin_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.base_method.load_extra_state(state["base"])
        self.load_plugin_state({k: v for k, v in state.items() if k != "base"})

    def plugin_state(self) -> dict[str, Any]:
        return {}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        pass

