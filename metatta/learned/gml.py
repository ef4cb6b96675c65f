"""The gradient memory layer (GML): a TTT-Linear layer run on every scalar
parameter coordinate as its own sequence.

MGTTA (Deng, Niu et al., AAAI 2025) feeds each coordinate's gradient features
(2 numbers per test batch) through a TTT-Linear layer whose hidden state is a
small linear model (W: DxD, b: D). On every input the hidden state takes one
gradient step on a self-supervised reconstruction loss, and the output is read
out with the updated state. Per coordinate p, with input x (2 features):

    q, k, v = Q x, K x, V x                               (Linear(2 -> D), no bias)
    l(W, b) = 0.5 * || LN(k W + b) - (v - k) ||^2         (LN: learnable inner LayerNorm)
    eta     = base_lr * sigmoid(w.x + c) / D * s           (s: see below)
    W' = W - eta * dl/dW,  b' = b - eta * dl/db
    out     = q + LN(q W' + b')

The gradient dl/dW, dl/db is computed in closed form (the LayerNorm backward
fused with the L2 loss, as TTT-Linear does), built from differentiable torch
ops, so the meta-gradient flows through the inner step into every parameter of
the layer. All P coordinates are processed at once: the memory is a pair of
tensors of shape (P, D, D) and (P, D).

Paper vs authors' code (keikeiqi/MGTTA, tta_library/metanet/TTT.py):
- The output reuses the inner LayerNorm (same weight/bias as in the loss), as
  the authors' TTT-Linear does.
- The authors' layer keeps TTT-Linear's learnable per-token step scale
  `s = max(0, 1 + t)` (t initialised to 0), so at initialisation eta is exactly
  the paper's formula. `learnable_token_eta=False` drops it (s = 1).
- LayerNorm eps is 1e-6 everywhere, as in the authors' code.
- The initial W (N(0, 0.02)) and b (0) are meta-learned parameters; a
  coordinate with no memory yet starts from them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Memory(NamedTuple):
    """Per-coordinate hidden state of the GML: W (P, D, D) and b (P, D)."""

    W: torch.Tensor
    b: torch.Tensor

    def detach(self) -> "Memory":
        return Memory(self.W.detach(), self.b.detach())

    @property
    def num_coordinates(self) -> int:
        return self.W.shape[0]


def normalize(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - mean) / std over the last dimension (biased variance); returns (z_hat, std)."""
    centered = z - z.mean(dim=-1, keepdim=True)
    # written out: torch.var over a last dimension of 8 is several times slower on CPU
    std = torch.sqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    return centered / std, std


def layer_norm_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """d/dz of 0.5 * ||weight * z_hat + bias - target||^2, row by row, in closed form.

    With g = weight * (y - target) the gradient w.r.t. the normalized input, the
    LayerNorm backward is (D g - sum(g) - z_hat * sum(g z_hat)) / (D std).
    """
    d = z.shape[-1]
    z_hat, std = normalize(z, eps)
    g = weight * (weight * z_hat + bias - target)
    return (d * g - g.sum(-1, keepdim=True) - z_hat * (g * z_hat).sum(-1, keepdim=True)) / (d * std)


class GradientMemoryLayer(nn.Module):
    """TTT-Linear over independent scalar sequences; see the module docstring.

    `forward(x, memory)` takes x of shape (P, in_features) and the memory of the
    P coordinates (None: start every coordinate from the learned initial W, b)
    and returns (output (P, width), updated memory). The updated memory is not
    detached: callers detach it between test batches (and between truncations
    of a meta-training unroll).
    """

    def __init__(
        self,
        in_features: int = 2,
        width: int = 8,
        base_lr: float = 1.0,
        learnable_token_eta: bool = True,
        eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        if in_features < 1 or width < 2:
            raise ValueError(f"GradientMemoryLayer: need in_features >= 1 and width >= 2, got {in_features}, {width}")
        self.in_features = in_features
        self.width = width
        self.base_lr = base_lr
        self.eps = eps
        self.q_proj = nn.Linear(in_features, width, bias=False)
        self.k_proj = nn.Linear(in_features, width, bias=False)
        self.v_proj = nn.Linear(in_features, width, bias=False)
        self.init_W = nn.Parameter(torch.randn(width, width) * init_std)
        self.init_b = nn.Parameter(torch.zeros(width))
        self.inner_norm = nn.LayerNorm(width, eps=eps)
        # Step-size gate: eta = base_lr * sigmoid(w.x + c) / width; TTT inits w ~ N(0, 0.02), c = 0.
        self.lr_gate = nn.Linear(in_features, 1)
        with torch.no_grad():
            self.lr_gate.weight.normal_(0.0, init_std)
            self.lr_gate.bias.zero_()
        if learnable_token_eta:
            self.token_eta = nn.Parameter(torch.zeros(1))
        else:
            self.register_parameter("token_eta", None)

    def initial_memory(self, num_coordinates: int) -> Memory:
        """The learned initial state for `num_coordinates` fresh coordinates (a view, no copy)."""
        d = self.width
        return Memory(self.init_W.expand(num_coordinates, d, d), self.init_b.expand(num_coordinates, d))

    def step_size(self, x: torch.Tensor) -> torch.Tensor:
        """Inner learning rate per coordinate, shape (P, 1)."""
        eta = self.base_lr * torch.sigmoid(self.lr_gate(x)) / self.width
        if self.token_eta is not None:
            eta = eta * torch.clamp_min(1.0 + self.token_eta, 0.0)
        return eta

    def forward(self, x: torch.Tensor, memory: Memory | None = None) -> tuple[torch.Tensor, Memory]:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"GradientMemoryLayer: input must have shape (P, {self.in_features}), got {tuple(x.shape)}")
        p, d = x.shape[0], self.width
        if memory is None:
            memory = self.initial_memory(p)
        elif memory.W.shape != (p, d, d) or memory.b.shape != (p, d):
            raise ValueError(
                f"GradientMemoryLayer: memory has shapes {tuple(memory.W.shape)}, {tuple(memory.b.shape)}; "
                f"expected ({p}, {d}, {d}) and ({p}, {d}) for {p} coordinates"
            )
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        ln_w, ln_b = self.inner_norm.weight, self.inner_norm.bias

        # One gradient step of the inner model on the reconstruction loss.
        z = torch.bmm(k.unsqueeze(1), memory.W).squeeze(1) + memory.b
        grad_z = layer_norm_l2_grad(z, v - k, ln_w, ln_b, self.eps)
        eta = self.step_size(x)
        W = torch.baddbmm(memory.W, (-eta * k).unsqueeze(-1), grad_z.unsqueeze(-2))  # W - eta k^T grad_z
        b = memory.b - eta * grad_z  # dl/db = grad_z

        # Read out with the updated inner model.
        out_z = torch.bmm(q.unsqueeze(1), W).squeeze(1) + b
        z_hat, _ = normalize(out_z, self.eps)
        return q + ln_w * z_hat + ln_b, Memory(W, b)
