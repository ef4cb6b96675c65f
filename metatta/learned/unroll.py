"""Differentiable test-time-adaptation trajectories for meta-training the MGG.

One truncation of K steps, starting from the trajectory's state
(theta_0, MGG states, pending gradient g_0 = dL(theta_0, x_0)/dtheta_0):

    for k = 1..K:
        d_k, s_k  = MGG(features(g_{k-1}), s_{k-1})          # g detached: data, not graph
        theta_k   = theta_{k-1} - inner_lr * s * d_k        # s: MGG.step_scale(); graph kept into the MGG
        L_k       = L(theta_k, x_k)                         # test-time loss on the *next* batch
        g_k       = dL_k/dtheta_k   (detached)              # feeds the next step
        O_k       = L_k, or CE(logits(theta_k, x_k), y_k)   # outer loss: lookahead | supervised
    meta_loss = mean_k O_k   (or the sum, or O_K alone)

and the meta-gradient d meta_loss / d MGG weights. K = 1 is the paper's
one-step lookahead (MGTTA trains exactly so: the loss of batch t+1 at the
params the MGG produced from batch t's gradient); K > 1 backpropagates through
the K-step trajectory (params and GML memory) within the truncation. Between
truncations everything is detached and persists in the `Trajectory`: params,
moments, memory and the pending gradient g_K, so consecutive truncations form
one continuous adaptation run whose every batch is used once.

The model is made functional with `higher.monkeypatch` (default) or
`torch.func.functional_call` (`backend="func"`); both give identical results.
With higher, the monkeypatched copy is built once per trajectory with
`track_higher_grads=False` (otherwise higher keeps every list of fast weights
it was ever given, and with it every truncation's graph); gradients still flow
through the params passed to each call.

`unroll` is a plain function of (mgg, trajectory, batches): a Ray actor holds
trajectories and calls it; the learner averages `UnrollResult.grads`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metatta.learned.gml import Memory
from metatta.learned.losses import TTALoss, record_features
from metatta.learned.mgg import MGG, TensorState

log = logging.getLogger(__name__)

BACKENDS = ("higher", "func")
OUTER_LOSSES = ("lookahead", "supervised")
OUTER_LOSS_OVER = ("all", "last")
REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass
class UnrollResult:
    """meta_loss: the combined outer loss as a float; grads: MGG parameter
    name -> meta-gradient (CPU tensor, zeros where a weight was unused);
    metrics: floats for logging."""

    meta_loss: float
    grads: dict[str, torch.Tensor]
    metrics: dict[str, float]
    skipped: bool = False  # non-finite meta-loss or meta-gradient: grads are zeros, do not step on them


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch is an image tensor, a (x, y[, ...]) tuple or an object with .x/.y (metatta Batch)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if hasattr(batch, "x"):
        return batch.x, getattr(batch, "y", None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise ValueError(f"unroll: a batch must be a tensor, (x, y) or have .x; got {type(batch).__name__}")


def _grads(loss: torch.Tensor, theta: Sequence[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d theta, detached; zeros for params the loss does not depend on."""
    grads = torch.autograd.grad(loss, list(theta), retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, theta)]


def _check_no_buffer_updates(model: nn.Module) -> None:
    # A BN layer in train mode with running buffers would update them on every
    # functional forward (in the model itself with torch.func): refuse it.
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None:
            raise ValueError(
                f"Trajectory: BN layer {name!r} is in train mode with running statistics, which the unroll would "
                "modify; configure the model first (metatta.methods.common.configure_norm_adaptation)"
            )


class Trajectory:
    """Persistent state of one TTA run that the MGG drives.

    `model` must already be configured for adaptation (e.g. with
    `metatta.methods.common.configure_norm_adaptation`: frozen, BN on batch
    statistics, norm affines requiring grad). The adapted parameters are
    `param_names`, by default every parameter that requires grad; the model's
    own parameters are never modified (theta lives here).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: TTALoss | None = None,
        param_names: Sequence[str] | None = None,
        backend: str = "higher",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"Trajectory: backend {backend!r} is not one of {BACKENDS}")
        _check_no_buffer_updates(model)
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        param_names = list(param_names)
        if not param_names:
            raise ValueError("Trajectory: no parameters to adapt (none requires grad and param_names is empty)")
        unknown = [n for n in param_names if n not in named]
        if unknown:
            raise ValueError(f"Trajectory: unknown parameter names {unknown[:5]}")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else TTALoss("entropy")
        self.param_names = param_names
        self.backend = backend
        self.source_theta = [named[n].detach().clone() for n in param_names]
        if backend == "higher":
            import higher

            self._fmodel = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=False)
            self._all_params = [p.detach() for p in model.parameters()]
            position = {id(p): i for i, p in enumerate(model.parameters())}
            self._slots = [position[id(named[n])] for n in param_names]
        self.reset()

    # ---- state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source params with fresh moments and memory (a new domain)."""
        self.theta = [t.clone() for t in self.source_theta]
        self.states: list[TensorState] = [TensorState.fresh(t) for t in self.theta]
        self.pending_grads: list[torch.Tensor] | None = None
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """Where this trajectory stands (params, MGG states, pending gradient, step count), as CPU
        tensors and plain values: what a checkpoint needs to continue it exactly (`load_state_dict`)."""
        def cpu(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        states = []
        for s in self.states:
            entry = {"step": s.step, "exp_avg": cpu(s.exp_avg), "exp_avg_sq": cpu(s.exp_avg_sq)}
            if s.memory is not None:
                entry.update(memory_W=cpu(s.memory.W), memory_b=cpu(s.memory.b))
            states.append(entry)
        return {"theta": [cpu(t) for t in self.theta], "states": states, "steps": self.steps,
                "pending_grads": None if self.pending_grads is None else [cpu(g) for g in self.pending_grads]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of a trajectory over the same parameters."""
        shapes = [tuple(t.shape) for t in self.source_theta]
        if [tuple(t.shape) for t in state["theta"]] != shapes or len(state["states"]) != len(shapes):
            raise ValueError(f"Trajectory.load_state_dict: the state is for parameters of shapes "
                             f"{[tuple(t.shape) for t in state['theta']]}, this trajectory adapts {shapes}")
        device = self.source_theta[0].device

        def here(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, copy=True)

        self.theta = [here(t) for t in state["theta"]]
        self.states = [
            TensorState(int(s["step"]), here(s["exp_avg"]), here(s["exp_avg_sq"]),
                        Memory(here(s["memory_W"]), here(s["memory_b"])) if "memory_W" in s else None)
            for s in state["states"]
        ]
        grads = state["pending_grads"]
        self.pending_grads = None if grads is None else [here(g) for g in grads]
        self.steps = int(state["steps"])

    @property
    def primed(self) -> bool:
        return self.pending_grads is not None

    def batches_needed(self, K: int) -> int:
        """How many batches `unroll(..., K)` consumes now: K, plus one to start a fresh trajectory."""
        return K if self.primed else K + 1

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in zip(self.param_names, self.theta)}

    # ---- the functional model ----------------------------------------------------------
    @property
    def hook_root(self) -> nn.Module:
        """The module whose forward hooks fire during `forward` (for feature recording)."""
        return self._fmodel if self.backend == "higher" else self.model

    def forward(self, theta: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of the model with the adapted parameters set to `theta`."""
        if self.backend == "higher":
            params = list(self._all_params)
            for slot, t in zip(self._slots, theta):
                params[slot] = t
            return self._fmodel(x, params=params)
        return torch.func.functional_call(self.model, dict(zip(self.param_names, theta)), (x,), strict=False)

    def loss_at(self, theta: Sequence[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(test-time loss, logits) at params `theta` on images `x`."""
        with record_features(self.hook_root, self.loss_fn.needs_features) as recorder:
            logits = self.forward(theta, x)
        return self.loss_fn(logits, recorder.features if self.loss_fn.needs_features else None), logits

    def prime(self, batch: Any) -> dict[str, float]:
        """Start the trajectory: the gradient at theta_0 on a first batch (no MGG involved)."""
        x, y = _split_batch(batch)
        theta = [t.detach().requires_grad_(True) for t in self.theta]
        with torch.enable_grad():
            loss, logits = self.loss_at(theta, x)
            self.pending_grads = _grads(loss, theta)
        metrics = {"prime_loss": loss.item()}
        if y is not None:
            metrics["prime_accuracy"] = (logits.argmax(1) == y.to(logits.device)).float().mean().item()
        return metrics


def _finite(tensors: Sequence[torch.Tensor]) -> bool:
    """All values of all tensors finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _states_finite(states: Sequence[TensorState]) -> bool:
    return _finite([t for s in states for t in (s.exp_avg, s.exp_avg_sq, *(s.memory or ()))])


def _outer_term(outer_loss: str, tta_loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The outer loss of one unroll step: the test-time loss itself (lookahead) or the
    cross-entropy against the batch's labels (supervised)."""
    if outer_loss == "lookahead":
        return tta_loss
    return F.cross_entropy(logits, y.to(logits.device))


def _meta_loss(terms: list[torch.Tensor], over: str, reduction: str) -> torch.Tensor:
    """Combine the per-step outer losses: all steps (mean or sum) or the last one only."""
    if over == "last":
        return terms[-1]
    stacked = torch.stack(terms)
    return stacked.mean() if reduction == "mean" else stacked.sum()


def _check_options(inner_lr: float, reduction: str, outer_loss: str, outer_loss_over: str) -> None:
    for name, value, allowed in (("reduction", reduction, REDUCTIONS), ("outer_loss", outer_loss, OUTER_LOSSES),
                                 ("outer_loss_over", outer_loss_over, OUTER_LOSS_OVER)):
        if value not in allowed:
            raise ValueError(f"unroll: {name} {value!r} is not one of {allowed}")
    if not inner_lr > 0:
        raise ValueError(f"unroll: inner_lr must be positive, got {inner_lr!r}")


def unroll(
    mgg: MGG,
    trajectory: Trajectory,
    batches: Sequence[Any],
    K: int | None = None,
    inner_lr: float = 1e-4,
    reduction: str = "mean",
    outer_loss: str = "lookahead",
    outer_loss_over: str = "all",
) -> UnrollResult:
    """One truncation of K MGG-driven TTA steps; returns the meta-loss and the
    meta-gradient of the MGG's weights (see the module docstring).

    `batches`: K batches (K + 1 for a trajectory not yet primed: the first one
    primes it). A batch is an image tensor, (x, y) or a metatta Batch; labels
    feed the accuracy metric, and the outer loss when `outer_loss="supervised"`.
    The trajectory's state is advanced and detached. The MGG's .grad fields are
    not touched. Options (defaults: the paper's, and this project's before them):

    - outer_loss: "lookahead" (the test-time loss of each step's next batch,
      unsupervised, the paper) or "supervised" (cross-entropy on that batch's
      labels; the inner steps still see only the unsupervised gradient).
    - outer_loss_over: "all" steps of the unroll (learned-optimizer practice:
      every step's outcome is trained, not only the end point) or the "last".
    - reduction over the steps for "all": "mean" (the step count does not scale
      the meta-gradient) or "sum".

    Stability: an inner update whose params or MGG state would be non-finite is
    skipped (params and state stay; counted in metrics["skipped_inner_updates"]).
    A truncation whose meta-loss or meta-gradient is non-finite returns zero
    gradients with `skipped=True`, and a trajectory whose carried state is
    non-finite restarts from the source params.
    """
    _check_options(inner_lr, reduction, outer_loss, outer_loss_over)
    batches = list(batches)
    trained = [(n, p) for n, p in mgg.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError("unroll: no MGG parameter requires grad")
    names, weights = [n for n, _ in trained], [p for _, p in trained]
    if K is None:
        K = len(batches) - (0 if trajectory.primed else 1)
    if K < 1 or len(batches) != trajectory.batches_needed(K):
        raise ValueError(f"unroll: K={K} steps need {trajectory.batches_needed(max(K, 1))} batches "
                         f"({'primed' if trajectory.primed else 'fresh'} trajectory), got {len(batches)}")
    split = [_split_batch(b) for b in batches]
    if outer_loss == "supervised" and any(y is None for _, y in split[-K:]):
        raise ValueError("unroll: outer_loss 'supervised' needs labelled batches, (x, y) or metatta Batches")
    metrics: dict[str, float] = {}
    if not trajectory.primed:
        metrics.update(trajectory.prime(batches[0]))
        split = split[1:]

    theta, states, grads = trajectory.theta, trajectory.states, trajectory.pending_grads
    num_coords = sum(t.numel() for t in theta)
    outer, tta_losses, correct, seen, abs_dir, skipped_inner = [], [], 0.0, 0, 0.0, 0
    with torch.enable_grad():
        scale = mgg.step_scale()
        for x, y in split:
            directions, new_states = mgg.directions(grads, states)
            new_theta = [t - inner_lr * scale * d for t, d in zip(theta, directions)]
            if _finite(new_theta) and _states_finite(new_states):
                theta, states = new_theta, new_states
            else:  # keep theta and state; the loss below still needs theta in the graph
                skipped_inner += 1
                theta = [t if t.requires_grad else t.detach().requires_grad_(True) for t in theta]
            loss, logits = trajectory.loss_at(theta, x)
            grads = _grads(loss, theta, retain_graph=True)
            outer.append(_outer_term(outer_loss, loss, logits, y))
            tta_losses.append(loss.detach())
            abs_dir += torch.stack([d.detach().abs().sum() for d in directions]).sum().item() / num_coords
            if y is not None:
                correct += (logits.detach().argmax(1) == y.to(logits.device)).float().sum().item()
                seen += len(y)
        meta_loss = _meta_loss(outer, outer_loss_over, reduction)
        skipped = not torch.isfinite(meta_loss).item()
        meta_grads = [None] * len(weights) if skipped else torch.autograd.grad(meta_loss, weights, allow_unused=True)
    skipped = skipped or not _finite([g for g in meta_grads if g is not None] or [meta_loss])

    with torch.no_grad():
        update_norm = torch.sqrt(sum(((t - t0) ** 2).sum() for t, t0 in zip(theta, trajectory.theta))).item()
        drift = torch.sqrt(sum(((t - s) ** 2).sum() for t, s in zip(theta, trajectory.source_theta))).item()
    trajectory.theta = [t.detach() for t in theta]
    trajectory.states = [s.detached() for s in states]
    trajectory.pending_grads = grads
    trajectory.steps += K
    restarted = skipped or not _finite(trajectory.theta + grads)
    if restarted:
        log.warning("unroll: non-finite %s; the trajectory restarts from the source params",
                    "meta-loss or meta-gradient" if skipped else "carried state")
        trajectory.reset()

    out_grads = {
        n: (g.detach() if g is not None and not skipped else torch.zeros_like(w)).to("cpu", copy=True)
        for n, w, g in zip(names, weights, meta_grads)
    }
    losses = torch.stack([o.detach() for o in outer])
    metrics.update({
        "meta_loss": meta_loss.item(),
        "outer_loss_first": losses[0].item(),
        "outer_loss_last": losses[-1].item(),
        "tta_loss_last": tta_losses[-1].item(),
        "mean_abs_direction": abs_dir / K,
        "step_scale": mgg.step_scale_value(),
        "update_norm": update_norm,
        "drift_from_source": drift,
        "trajectory_steps": float(trajectory.steps),
        "meta_grad_norm": torch.sqrt(sum((g.double() ** 2).sum() for g in out_grads.values())).item(),
        "skipped_inner_updates": float(skipped_inner),
        "skipped_unroll": float(skipped),
        "trajectory_restarted": float(restarted),
    })
    if seen:
        metrics["accuracy_after_update"] = correct / seen
    return UnrollResult(meta_loss.item(), out_grads, metrics, skipped)
