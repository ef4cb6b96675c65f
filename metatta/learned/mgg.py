"""The meta gradient generator (MGG): a learned optimizer for test-time adaptation.

Per scalar parameter coordinate (MGTTA, Deng, Niu et al., AAAI 2025):

    m, v   <- Adam-style moments of its gradient g (beta1 0.9, beta2 0.99)
    x      =  [m_hat / (sqrt(v_hat) + 1e-8), g / (sqrt(v_hat) + 1e-8)]   (bias-corrected)
    h      =  GML(x)                        (gradient memory layer, per-coordinate memory)
    d      =  tanh(Linear(8 -> 1, no bias)(LayerNorm(8)(h)))     in [-1, 1]
    theta  <- theta - lr * s * d        (s = exp(log_step_scale), or 1)

About 160 parameters (164 with the default options). Gradient features are
always detached: the MGG sees gradients as data, as in the paper.

Learned step size (beyond the paper, `learned_step_size=True`): with d bounded
in [-1, 1], the paper's MGG can never move a coordinate further than lr per
batch, whatever it learns. A meta-learned scalar `log_step_scale` multiplies
the base lr (inner_lr in meta-training, adapt_lr at test time) by
s = exp(log_step_scale), so meta-training can make the steps larger (or
smaller) when that lowers the outer loss. It is a relative scale, not an
absolute lr, because (a) at its initial value 0 the MGG is exactly the paper's
(s = 1), (b) a learning-rate sweep at test time (x3, x10 of adapt_lr) keeps its
meaning, and (c) the same code path serves the optimizer and the unroll. Train
with inner_lr equal to the test-time adapt_lr when the scale is learned (the
paper trains at 1e-4 and tests at 1e-3), or the learned s is applied to a
10x larger base at test time. The parameter lives in the MGG's state dict, so a
saved or registered adapter carries it; `from_state_dict` reads the option off
the weights. The exponent keeps s positive (d carries the sign) and makes the
meta-gradient act on the order of magnitude of the step.

Paper vs authors' code: the authors bias-correct with 1 - beta^(t+1) at step t
(their batch counter is incremented before use and then offset by one);
standard Adam, the default here, uses 1 - beta^t. `bias_correction_offset=1`
reproduces the authors' features.

State: the MGG module holds only the meta-learned weights. What evolves during
adaptation lives in a `TensorState` per adapted parameter tensor (step count,
moments, GML memory); `MGG.directions` is a pure function of (grads, states) ->
(directions, new states), used both by `MGGOptimizer` (test time, no graph) and
by the differentiable unroll (meta-training, graph kept).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from metatta.learned.gml import GradientMemoryLayer, Memory
from metatta.safe_files import read_json_file, read_state_dict

log = logging.getLogger(__name__)

NUM_FEATURES = 2  # [m_hat / sqrt(v_hat), g / sqrt(v_hat)]
WEIGHTS_FILE = "weights.pt"  # same file names as metatta.tracking's adapter directories
CONFIG_FILE = "adapter.json"


@dataclasses.dataclass
class TensorState:
    """What the MGG remembers about one adapted parameter tensor.

    `memory` is None until the first step: the coordinates then start from the
    MGG's learned initial W, b (so the meta-gradient reaches those too).
    """

    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    memory: Memory | None = None

    @classmethod
    def fresh(cls, like: torch.Tensor) -> "TensorState":
        zeros = torch.zeros_like(like, memory_format=torch.contiguous_format).detach()
        return cls(0, zeros, zeros.clone(), None)

    def detached(self) -> "TensorState":
        memory = None if self.memory is None else self.memory.detach()
        return TensorState(self.step, self.exp_avg.detach(), self.exp_avg_sq.detach(), memory)


def moment_features(
    grad: torch.Tensor,
    state: TensorState,
    beta1: float = 0.9,
    beta2: float = 0.99,
    eps: float = 1e-8,
    bias_correction_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Update the moments with `grad` (detached) and return (features (numel, 2), exp_avg, exp_avg_sq).

    Pure: the tensors in `state` are not modified.
    """
    grad = grad.detach()
    step = state.step + 1 + bias_correction_offset
    exp_avg = beta1 * state.exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * grad * grad
    m_hat = exp_avg / (1 - beta1**step)
    denom = torch.sqrt(exp_avg_sq / (1 - beta2**step)) + eps
    features = torch.stack([(m_hat / denom).reshape(-1), (grad / denom).reshape(-1)], dim=1)
    return features, exp_avg, exp_avg_sq


class MGG(nn.Module):
    """Meta gradient generator; see the module docstring.

    `forward(features, memory=None) -> (direction, memory)`: features (P, 2),
    direction (P,) in [-1, 1], memory the GML state of the P coordinates.
    `directions(grads, states) -> (directions, states)` does the whole per-tensor
    bookkeeping (moments, features, memory) for a list of gradients.
    """

    def __init__(
        self,
        width: int = 8,
        base_lr: float = 1.0,
        learnable_token_eta: bool = True,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        bias_correction_offset: int = 0,
        norm_eps: float = 1e-6,
        learned_step_size: bool = False,
        init_log_step_scale: float = 0.0,
    ):
        super().__init__()
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"MGG: betas must lie in [0, 1), got ({beta1}, {beta2})")
        if bias_correction_offset < 0:
            raise ValueError(f"MGG: bias_correction_offset must be >= 0, got {bias_correction_offset}")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.bias_correction_offset = bias_correction_offset
        self.gml = GradientMemoryLayer(NUM_FEATURES, width, base_lr, learnable_token_eta, eps=norm_eps)
        self.out_norm = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, 1, bias=False)
        if learned_step_size:
            if not math.isfinite(init_log_step_scale):
                raise ValueError(f"MGG: init_log_step_scale must be finite, got {init_log_step_scale!r}")
            self.log_step_scale = nn.Parameter(torch.tensor(float(init_log_step_scale)))
        else:
            self.register_parameter("log_step_scale", None)

    @property
    def learned_step_size(self) -> bool:
        return self.log_step_scale is not None

    def step_scale(self) -> torch.Tensor | float:
        """The factor s on the base lr: exp(log_step_scale) (a tensor in the graph), or 1.0."""
        return 1.0 if self.log_step_scale is None else self.log_step_scale.exp()

    def step_scale_value(self) -> float:
        """`step_scale()` as a plain float (no graph), for logging and the test-time optimizer."""
        return 1.0 if self.log_step_scale is None else self.log_step_scale.detach().exp().item()

    # ---- the network ---------------------------------------------------------------
    def forward(self, features: torch.Tensor, memory: Memory | None = None) -> tuple[torch.Tensor, Memory]:
        h, memory = self.gml(features, memory)
        return torch.tanh(self.head(self.out_norm(h))).squeeze(-1), memory

    # ---- per-tensor bookkeeping ----------------------------------------------------
    def init_states(self, params: Sequence[torch.Tensor]) -> list[TensorState]:
        return [TensorState.fresh(p) for p in params]

    def directions(
        self, grads: Sequence[torch.Tensor], states: Sequence[TensorState]
    ) -> tuple[list[torch.Tensor], list[TensorState]]:
        """Directions in [-1, 1] shaped like `grads`, and the new states.

        All coordinates of all tensors go through the GML in one batch. The new
        memories are not detached (the unroll backpropagates through them); call
        `TensorState.detached()` between test batches.
        """
        if len(grads) != len(states):
            raise ValueError(f"MGG.directions: {len(grads)} gradients but {len(states)} states")
        if not grads:
            return [], []
        dtype = self.head.weight.dtype
        feats, moments, sizes = [], [], []
        for g, s in zip(grads, states):
            if s.exp_avg.shape != g.shape:
                raise ValueError(f"MGG.directions: state of shape {tuple(s.exp_avg.shape)} for a gradient of shape {tuple(g.shape)}")
            f, m, v = moment_features(g, s, self.beta1, self.beta2, self.eps, self.bias_correction_offset)
            feats.append(f)
            moments.append((m, v))
            sizes.append(g.numel())
        memory = self._joint_memory(states, sizes)
        direction, memory = self(torch.cat(feats).to(dtype), memory)
        new_states = []
        for i, (d, W, b) in enumerate(zip(direction.split(sizes), memory.W.split(sizes), memory.b.split(sizes))):
            new_states.append(TensorState(states[i].step + 1, moments[i][0], moments[i][1], Memory(W, b)))
        return [d.reshape(g.shape).to(g.dtype) for d, g in zip(direction.split(sizes), grads)], new_states

    def _joint_memory(self, states: Sequence[TensorState], sizes: list[int]) -> Memory | None:
        if all(s.memory is None for s in states):
            return None
        parts = [
            self.gml.initial_memory(n) if s.memory is None else s.memory for s, n in zip(states, sizes)
        ]
        if len(parts) == 1:
            return parts[0]
        return Memory(torch.cat([m.W for m in parts]), torch.cat([m.b for m in parts]))

    # ---- saving and loading ----------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Everything besides the weights needed to rebuild this MGG (JSON-serializable)."""
        return {
            "width": self.gml.width,
            "base_lr": self.gml.base_lr,
            "learnable_token_eta": self.gml.token_eta is not None,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "bias_correction_offset": self.bias_correction_offset,
            "norm_eps": self.gml.eps,
            "learned_step_size": self.learned_step_size,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **hparams: Any) -> "MGG":
        """Rebuild from weights; width and the token-eta and step-size options are read off the weights."""
        if "gml.init_W" not in state:
            raise ValueError(f"not an MGG state dict (no 'gml.init_W'; keys: {sorted(state)[:6]}...)")
        hparams = dict(hparams)
        hparams["width"] = state["gml.init_W"].shape[0]
        hparams["learnable_token_eta"] = "gml.token_eta" in state
        hparams["learned_step_size"] = "log_step_scale" in state
        hparams.pop("init_log_step_scale", None)  # the weights hold the value
        mgg = cls(**hparams)
        mgg.load_state_dict(state)
        return mgg


def save_mgg(mgg: MGG, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write an adapter directory: `weights.pt` (state dict) and `adapter.json`
    ({"kind": "mgg", "hparams": ..., **extra}), the layout metatta.tracking registers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in mgg.state_dict().items()}, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({"kind": "mgg", "hparams": mgg.hparams(), **(extra or {})}, indent=2))
    return directory


def load_mgg(path: str | Path, map_location: str | torch.device = "cpu", **hparams: Any) -> MGG:
    """Load an MGG from an adapter directory (weights.pt + adapter.json) or a bare
    weights file (a state dict; hparams then default unless given). Loading never
    unpickles objects (torch.load(weights_only=True))."""
    path = Path(path)
    if path.is_dir():
        weights, config_file = path / WEIGHTS_FILE, path / CONFIG_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"MGG directory {path} has no {WEIGHTS_FILE}")
        if config_file.is_file():
            stored = read_json_file(config_file, "MGG config").get("hparams", {})
            hparams = {**stored, **hparams}
        path = weights
    elif not path.is_file():
        raise FileNotFoundError(f"MGG weights not found: {path}")
    state = read_state_dict(path, "MGG weights", map_location)
    hparams.pop("width", None)
    hparams.pop("learnable_token_eta", None)
    hparams.pop("learned_step_size", None)
    try:
        return MGG.from_state_dict(state, **hparams)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot load as an MGG: {e}") from e
