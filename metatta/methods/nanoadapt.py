"""NanoAdapt: test-time adaptation down to batch size 1 (Zhao, Li, Huang, IJCAI 2024;
no public code), as a plug-in for any BN-based method (`metatta.methods.plugin`).

Three components, each switchable (`dbc`, `ewga`, `pcg`) so the paper's ablation
can be rerun:

- Dynamic BN calibration (DBC, `DBCNorm`): every BN layer keeps EMAs of E[x] and
  E[x^2] per channel of its input, starting from the source statistics, and
  normalizes with mu = m * mu_prior + (1 - m) * mu_batch (likewise E[x^2]),
  var = E[x^2] - mu^2, gradients flowing through the batch part. m is
  `dbc_momentum` (0.98, the paper's best), the momentum of one image: a batch of
  B images keeps m^B of the prior (`dbc_per_image`, default), so the EMA spans
  the same number of test images (about 1 / (1 - m) = 50) at every batch size
  and follows a new domain at batch 200 as it does at batch 1; the paper's
  experiments are at batch 1, where both readings agree (`dbc_per_image: false`
  keeps m per batch).
- First-order correction of the stored moments (`taylor_correction`): the EMAs
  were computed under earlier parameters; right after every parameter update
  theta -> theta + delta they are moved by the Taylor term J delta, J the
  Jacobian of the layer's input moments with respect to the parameters, computed
  by autograd as Cross-Iteration BN does, here in forward mode (one
  Jacobian-vector product through the whole network on the batch just adapted on,
  `torch.autograd.forward_ad`). Against which parameters: every parameter the
  base method adapts, upstream of the layer, not only the layer just before it
  (Cross-Iteration BN's choice). With Tent, EATA, SAR or MGTTA only BN affine
  parameters adapt and the convolution before each BN is frozen, so CBN's term
  would be identically zero; the input of BN layer l still moves with the
  affines of every BN layer before l, and that is what is corrected. With PALM,
  the adapted convolutions before a layer count too. J is that of the current
  batch's moments (the same population quantity the EMA estimates, to first
  order); tangents propagate through the earlier layers' DBC normalization,
  whose statistics move with the parameters as well.
- Entropy-weighted gradient accumulation (EWGA): the base's gradients of S =
  `accumulation_steps` consecutive batches are summed with weights
  (r_i / S) * min(1 / H_i, 1), r_i = (log S + log i) / (2 log S) (r = 1 for
  S = 1), H_i the mean prediction entropy of batch i (the sample's, at batch size
  1), and the optimizer steps once every S batches on that sum. Implemented at the
  innermost optimizer's `step` (below SAM), so any base and any optimizer
  (Adam, SGD, PALM's per-tensor rates, the learned MGG) accumulate the same way.
- Proxy computation graph (PCG): with gradients on, every forward of the base
  method also carries `num_views` (k, 3) augmented views of each sample
  (`proxy_views`: flip, rotation, crop, and grayscale / saturation for colour
  images); the BN layers compute the DBC estimate from the real samples only, and
  use it as the value of the statistics while their gradient is that of the
  statistics of the whole proxy batch (sample + views), so the gradient carries
  the cross-sample terms a batch of 1 lacks. The views' logits are dropped: the
  base method sees the logits of its samples only. Without DBC the proxy batch's
  own statistics normalize it. Under no_grad (a BN base, prediction) no views
  are made.

Learning rate: the base's published lr is scaled (MethodConfig.lr_batch_size) to
the number of test images behind one update, N * S with EWGA; a `lr` set on
nanoadapt itself (a tuned one) is used for its own `lr_batch_size` instead.

Defaults: base Tent, m 0.98, k 3 (the paper's best), S 8 (not given in the paper
text we had), all components on.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torchvision.transforms.v2 import functional as TF

from metatta.methods.base import register
from metatta.methods.common import softmax_entropy
from metatta.methods.plugin import BNPlugin, PluginConfig, PluginNorm, channel_moments, normalize


@dataclasses.dataclass
class NanoAdaptConfig(PluginConfig):
    dbc: bool = True  # dynamic BN calibration
    dbc_momentum: float = 0.98  # m: prior <- m * prior + (1 - m) * batch (per image, see dbc_per_image)
    dbc_per_image: bool = True  # a batch of B images mixes with m ** B; false: with m
    taylor_correction: bool = True  # move the stored moments by J * delta after each update
    ewga: bool = True  # entropy-weighted gradient accumulation
    accumulation_steps: int = 8  # S: batches per optimizer step
    pcg: bool = True  # proxy computation graph
    num_views: int = 3  # k: augmented views forwarded with each sample

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dbc_momentum <= 1.0:
            self.refuse("dbc_momentum", "in [0, 1]")
        if self.num_views < 0:
            self.refuse("num_views", ">= 0")
        if self.accumulation_steps < 1:
            self.refuse("accumulation_steps", ">= 1")


# ---- DBC -------------------------------------------------------------------------------------------
class DBCNorm(PluginNorm):
    """BN on the DBC estimate of its input's statistics (see the module docstring)."""

    stat_buffers = ("dbc_mean", "dbc_sqmean")

    def setup_statistics(self, momentum: float = 0.98, per_image: bool = True, enabled: bool = True) -> None:
        mean, var = self.source_statistics()
        device = self.weight.device if self.weight is not None else mean.device
        self.register_buffer("dbc_mean", mean.to(device))
        self.register_buffer("dbc_sqmean", (var + mean * mean).to(device))
        self.dbc_momentum = momentum
        self.dbc_per_image = per_image
        self.plugin_enabled = enabled
        self.probing = False  # set during the Taylor-correction pass

    def plugin_forward(self, x: torch.Tensor) -> torch.Tensor:
        real = self.real_rows(x)
        m = self.dbc_momentum ** real.shape[0] if self.dbc_per_image else self.dbc_momentum
        mean_b, sq_b = channel_moments(real)
        prior_mean, prior_sq = self.corrected_prior(mean_b, sq_b) if self.probing else self.prior()
        mean = m * prior_mean + (1 - m) * mean_b
        sq = m * prior_sq + (1 - m) * sq_b
        self.store(mean, sq)
        if self.num_real is not None and x.shape[0] > self.num_real:
            # PCG: the DBC values, with the gradient of the proxy batch's statistics.
            mean_p, sq_p = channel_moments(x)
            mean = mean_p + (mean - mean_p).detach()
            sq = sq_p + (sq - sq_p).detach()
        var = (sq - mean * mean).clamp_min(0.0)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def corrected_prior(self, mean_b: torch.Tensor, sq_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Taylor pass: add the tangent of this batch's moments (J * delta) to the stored
        moments, and return them as dual tensors with that tangent, so the layers after this
        one see statistics that move with the parameters."""
        t_mean, t_sq = fwAD.unpack_dual(mean_b).tangent, fwAD.unpack_dual(sq_b).tangent
        if t_mean is None or t_sq is None:  # nothing adapted upstream of this layer
            return self.dbc_mean, self.dbc_sqmean
        with torch.no_grad():
            self.dbc_mean.add_(t_mean)
            self.dbc_sqmean.add_(t_sq)
        return fwAD.make_dual(self.dbc_mean.clone(), t_mean), fwAD.make_dual(self.dbc_sqmean.clone(), t_sq)


class DBCBatchNorm1d(DBCNorm, nn.BatchNorm1d):
    pass


class DBCBatchNorm2d(DBCNorm, nn.BatchNorm2d):
    pass


class DBCBatchNorm3d(DBCNorm, nn.BatchNorm3d):
    pass


DBC_CLASSES = {nn.BatchNorm1d: DBCBatchNorm1d, nn.BatchNorm2d: DBCBatchNorm2d, nn.BatchNorm3d: DBCBatchNorm3d}


def moment_tangents(model: nn.Module, layers: list[DBCNorm], x: torch.Tensor,
                    tangents: dict[str, torch.Tensor]) -> None:
    """The Taylor correction: one forward-mode pass of `model` on `x` with the named
    parameters carrying `tangents` (their change); every DBC layer adds the tangent of
    its input moments to its stored moments. Under no_grad: nothing is recorded for backward."""
    params = dict(model.named_parameters())
    with torch.no_grad(), fwAD.dual_level():
        duals = {name: fwAD.make_dual(params[name].detach(), t) for name, t in tangents.items()}
        for layer in layers:
            layer.probing = True
        try:
            torch.func.functional_call(model, duals, (x,))
        finally:
            for layer in layers:
                layer.probing = False


# ---- EWGA ----------------------------------------------------------------------------------------------
def ewga_ramp(i: int, steps: int) -> float:
    """r_i = (log S + log i) / (2 log S) for the i-th (1-based) of S accumulated batches; 1 for S = 1."""
    if steps == 1:
        return 1.0
    return (math.log(steps) + math.log(i)) / (2.0 * math.log(steps))


def entropy_weight(entropy: float) -> float:
    """min(1 / H, 1): confident predictions count fully, uncertain ones less."""
    return 1.0 if entropy <= 1.0 else 1.0 / entropy


def ewga_weight(logits: torch.Tensor | None, i: int, steps: int) -> float:
    """(r_i / S) * min(1 / H_i, 1), H_i the mean entropy of the batch's predictions."""
    h = float(softmax_entropy(logits.float()).mean()) if logits is not None else 0.0
    return ewga_ramp(i, steps) / steps * entropy_weight(h)


# ---- PCG -------------------------------------------------------------------------------------------------
def proxy_views(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k augmented views of every image of `x` (B, C, H, W) -> (k * B, C, H, W), view-major.
    Each view draws one transform, shared by the batch's images: rotation (+-15 deg), crop
    (70-100% of the side, resized back), grayscale or saturation (0.5-1.5, colour only), each
    followed by a horizontal flip with probability 1/2."""
    size = list(x.shape[-2:])
    ops = ["rotate", "crop"] + (["grayscale", "saturation"] if x.shape[1] == 3 else [])
    views = []
    for _ in range(k):
        u = torch.rand(5, generator=generator).tolist()
        op = ops[min(int(u[0] * len(ops)), len(ops) - 1)]
        if op == "rotate":
            v = TF.rotate(x, angle=30.0 * u[1] - 15.0, interpolation=TF.InterpolationMode.BILINEAR)
        elif op == "crop":
            side = 0.7 + 0.3 * u[1]
            h, w = max(1, round(size[0] * side)), max(1, round(size[1] * side))
            top, left = round((size[0] - h) * u[2]), round((size[1] - w) * u[3])
            v = TF.resized_crop(x, top, left, h, w, size, antialias=False)
        elif op == "grayscale":
            v = TF.rgb_to_grayscale(x, num_output_channels=3)
        else:
            v = TF.adjust_saturation(x, 0.5 + u[1])
        views.append(TF.horizontal_flip(v) if u[4] < 0.5 else v)
    return torch.cat(views)


# ---- the method ------------------------------------------------------------------------------------------
@register("nanoadapt")
class NanoAdapt(BNPlugin):
    Config = NanoAdaptConfig
    layer_classes = DBC_CLASSES

    def layer_options(self, config: NanoAdaptConfig) -> dict[str, Any]:
        return {"momentum": config.dbc_momentum, "per_image": config.dbc_per_image, "enabled": config.dbc}

    def base_batch_size(self, config: NanoAdaptConfig) -> int | None:
        if config.batch_size is None:
            return None
        return config.batch_size * (config.accumulation_steps if config.ewga else 1)

    def init_extra_state(self) -> None:
        self._accumulated: list[torch.Tensor] | None = None  # EWGA's weighted gradient sum
        self._accumulated_batches = 0

    # ---- PCG ---------------------------------------------------------------------------------------
    def expand_batch(self, x: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.pcg or cfg.num_views == 0 or not torch.is_grad_enabled() or x.dim() != 4:
            return None
        return proxy_views(x, cfg.num_views)

    # ---- EWGA ---------------------------------------------------------------------------------------
    def accumulate(self, params: list[torch.Tensor]) -> bool:
        cfg = self.config
        if not cfg.ewga:
            return True
        i = self._accumulated_batches + 1
        weight = ewga_weight(self._first_logits, i, cfg.accumulation_steps)
        previous = self._accumulated or [torch.zeros_like(p) for p in params]
        summed = [a if p.grad is None else a + weight * p.grad for a, p in zip(previous, params)]
        if not math.isfinite(weight) or not bool(torch.isfinite(torch.cat([s.reshape(-1) for s in summed])).all()):
            self.refuse_update()  # the guard restores the sum as it was
            return False
        if i < cfg.accumulation_steps:
            self._accumulated, self._accumulated_batches = summed, i
            return False
        for p, s in zip(params, summed):
            p.grad = s
        self._accumulated, self._accumulated_batches = None, 0
        return True

    # ---- DBC's correction ---------------------------------------------------------------------------
    def after_update(self, params: list[torch.Tensor], before: list[torch.Tensor]) -> None:
        cfg = self.config
        if not (cfg.dbc and cfg.taylor_correction) or self._batch is None:
            return
        names = self._parameter_names()
        tangents = {names[id(p)]: p.detach() - b for p, b in zip(params, before) if id(p) in names}
        if tangents:
            moment_tangents(self.model, self.norms, self._batch, tangents)

    def _parameter_names(self) -> dict[int, str]:
        if "_names" not in self.__dict__:
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        return self._names

    # ---- state --------------------------------------------------------------------------------------
    def plugin_state(self) -> dict[str, Any]:
        return {"accumulated": self._accumulated, "accumulated_batches": self._accumulated_batches}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self._accumulated = state["accumulated"]
        self._accumulated_batches = state["accumulated_batches"]
