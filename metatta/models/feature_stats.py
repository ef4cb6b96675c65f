"""Clean feature statistics for MGTTA's test-time loss.

MGTTA (authors' code) aligns, at test time, the mean and std of the CLS token
after every transformer block with the same statistics on clean source data.
This module says which layers are "feature taps" for each architecture, records
their outputs during a forward pass, and computes the clean statistics once.

What a tap contributes is a matrix of feature *samples* (N, D), and the
statistics are the mean and (unbiased) std over its rows:

- ViT (LayerNorm): the CLS token after every block, one row per image,
  D = embed_dim. This is the authors' choice.
- BN ResNets / WRNs: the output of every residual block, with every spatial
  position of every image as one row, D = channels; i.e. per-channel mean and
  std over the batch and the spatial positions, the same reduction BatchNorm
  uses. This is our analogue for CNNs (the paper only has a ViT): it keeps the
  per-channel statistics that distribution shift moves, is independent of the
  image size, and is defined for a batch of one image.
- Anything else: the outputs of its normalization layers (BN/LN/GN), with the
  same rules by output rank: (B, D) as is, (B, T, D) tokens -> CLS token (or
  the token mean for models without one), (B, C, H, W) -> (B*H*W, C).

Our models name their taps with a `feature_tap_modules()` method; timm
VisionTransformers and torchvision/timm-style ResNets (layer1..layer4) are
recognised by structure.

The source statistics are a flat dict of tensors, "mean.<i>" and "std.<i>" of
shape (D_i,) for tap i, stored inside the source checkpoint (see
`metatta.models.checkpoint`; `load_feature_stats` reads them back).
"""
from __future__ import annotations

import logging
import sys
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _vision_transformers(model: nn.Module) -> list[nn.Module]:
    # A model can only hold a timm ViT if timm's module is loaded; do not import timm (slow) otherwise.
    vit_module = sys.modules.get("timm.models.vision_transformer")
    if vit_module is None:
        return []
    return [m for m in model.modules() if isinstance(m, vit_module.VisionTransformer)]


def is_vision_transformer(model: nn.Module) -> bool:
    """Whether `model` holds a timm VisionTransformer (this project's ViTClassifier does): the
    model MGTTA's authors' loss (CLS-token statistics after every block) is defined for."""
    return bool(_vision_transformers(model))


def feature_taps(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the features, in forward order."""
    for m in model.modules():
        if callable(getattr(m, "feature_tap_modules", None)):
            return list(m.feature_tap_modules())
    vits = _vision_transformers(model)
    if vits:
        return list(vits[0].blocks)
    for m in model.modules():
        stages = [getattr(m, f"layer{i}", None) for i in range(1, 5)]
        if isinstance(stages[0], nn.Sequential) and isinstance(stages[1], nn.Sequential):
            return [block for stage in stages if isinstance(stage, nn.Sequential) for block in stage]
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    if not norms:
        raise ValueError(f"feature_taps: {type(model).__name__} has no known feature taps "
                         "(no feature_tap_modules(), ViT blocks, ResNet stages or normalization layers)")
    return norms


def _uses_class_token(model: nn.Module) -> bool:
    vits = _vision_transformers(model)
    if vits:
        return getattr(vits[0], "cls_token", None) is not None
    return getattr(model, "cls_token", None) is not None


def feature_samples(output: torch.Tensor, class_token: bool = True) -> torch.Tensor:
    """A tap's output as a (N, D) matrix of feature samples (see the module docstring)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"feature tap returned {type(output).__name__}, not a tensor")
    if output.dim() == 2:
        return output
    if output.dim() == 3:
        return output[:, 0] if class_token else output.mean(dim=1)
    if output.dim() == 4:
        return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])
    raise ValueError(f"feature tap output has unsupported shape {tuple(output.shape)}; expected (B, D), (B, T, D) or (B, C, H, W)")


class FeatureRecorder:
    """Record the feature samples of every tap during forward passes.

        with FeatureRecorder(model) as rec:
            logits = model(x)
        rec.features        # [(N_i, D_i) per tap], in the order the taps fired
        rec.stats()         # [(mean_i, std_i)], differentiable w.r.t. the model

    The recorded tensors keep their autograd graph, so a loss on them
    backpropagates into the model. Several forwards inside one block append
    to the same list; call `clear()` between them. Hooks are removed on exit.
    Register on the module that actually runs: for a functional copy (e.g.
    higher's monkeypatched model) pass the copy.
    """

    def __init__(self, model: nn.Module, taps: list[nn.Module] | None = None):
        self.model = model
        self.taps = list(taps) if taps is not None else feature_taps(model)
        self.class_token = _uses_class_token(model)
        self.features: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs, output) -> None:
        self.features.append(feature_samples(output, self.class_token))

    def __enter__(self) -> "FeatureRecorder":
        self._handles = [tap.register_forward_hook(self._hook) for tap in self.taps]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.features = []

    def stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-tap (mean, unbiased std) over the recorded rows of this batch."""
        out = []
        for f in self.features:
            if f.shape[0] < 2:
                raise ValueError(f"FeatureRecorder.stats: a tap gave {f.shape[0]} feature sample(s); std needs >= 2")
            std, mean = torch.std_mean(f, dim=0)
            out.append((mean, std))
        return out


def _image_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of images from a (N, C, H, W) tensor or an iterable of tensors / (x, y, ...) tuples."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"compute_feature_stats: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("compute_feature_stats: every item must be a (B, C, H, W) tensor or a tuple starting with one")
        yield x


@torch.no_grad()
def compute_feature_stats(
    model: nn.Module,
    images,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean and unbiased std of every tap's features over all of `images`.

    `images`: a float tensor (N, C, H, W) in [0, 1], or an iterable of such
    batches (or of (x, y, ...) tuples, e.g. a DataLoader). The model runs in
    eval mode (BN with its running statistics: the source model as it is
    deployed) and is put back in its previous mode afterwards. The pooled
    statistics are exact (Chan et al.'s parallel merge in float64), so they do
    not depend on the batching. Returns float32 CPU tensors "mean.<i>",
    "std.<i>" of shape (D_i,).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    counts: list[int] = []
    means: list[torch.Tensor] = []
    m2s: list[torch.Tensor] = []
    try:
        with FeatureRecorder(model) as rec:
            for x in tqdm(_image_batches(images, batch_size), desc="feature stats", disable=not progress, leave=False):
                rec.clear()
                model(x.to(device))
                if not counts:
                    counts, means = [0] * len(rec.features), [None] * len(rec.features)
                    m2s = [None] * len(rec.features)
                if len(rec.features) != len(counts):
                    raise ValueError(f"compute_feature_stats: {len(rec.features)} taps fired, expected {len(counts)}")
                for i, f in enumerate(rec.features):
                    f = f.double()
                    n_b, mean_b = f.shape[0], f.mean(dim=0)
                    m2_b = (f - mean_b).pow(2).sum(dim=0)
                    if counts[i] == 0:
                        counts[i], means[i], m2s[i] = n_b, mean_b, m2_b
                        continue
                    n = counts[i] + n_b
                    delta = mean_b - means[i]
                    means[i] = means[i] + delta * (n_b / n)
                    m2s[i] = m2s[i] + m2_b + delta.pow(2) * (counts[i] * n_b / n)
                    counts[i] = n
    finally:
        model.train(was_training)
    if not counts:
        raise ValueError("compute_feature_stats: no images were given")
    stats = {}
    for i, (n, mean, m2) in enumerate(zip(counts, means, m2s)):
        if n < 2:
            raise ValueError(f"compute_feature_stats: tap {i} has {n} feature sample(s); std needs >= 2 (give more images)")
        stats[f"mean.{i}"] = mean.float().cpu()
        stats[f"std.{i}"] = (m2 / (n - 1)).sqrt().float().cpu()
    log.debug("feature stats over %d taps (%s samples)", len(counts), counts)
    return stats
