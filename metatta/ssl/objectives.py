"""The networks and losses of each training stage (`metatta.ssl.stages`): the network a stage
starts from, its objective (a module returning (loss, metrics)) and the augmented inputs that
objective takes."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metatta.models import build_model, load_source_model
from metatta.models.checkpoint import read_header
from metatta.source import augment_batch
from metatta.ssl.align import alignment_loss, feature_matching_loss
from metatta.ssl.augment import SimCLRAugment
from metatta.ssl.networks import build_network, source_model_info, split_classifier
from metatta.ssl.rotation import NUM_ROTATIONS, rotate_batch
from metatta.ssl.simclr import nt_xent
from metatta.ssl.stages import HEADS, AlignStageConfig, CTATrainConfig, load_stage_state, trains_with_flips


# ---- the networks of each stage --------------------------------------------------------------
def _head_dims(cfg: CTATrainConfig) -> dict[str, list[int]]:
    out = cfg.projection_dim if cfg.method == "cta" else NUM_ROTATIONS
    return {HEADS[cfg.method]: [cfg.head_hidden, out]}


def initial_network(stage: str, cfg: CTATrainConfig, checkpoint: str, files: dict[str, Path]):
    """The MultiHeadNet a stage starts from (before any checkpoint of its own is loaded)."""
    source = load_source_model(checkpoint)
    net = build_network(source, _head_dims(cfg))
    if stage == "simclr":  # a fresh encoder of the source architecture; the classifier stays the source's
        net.encoder.load_state_dict(build_network(_fresh_source(checkpoint), {}).encoder.state_dict())
    elif stage == "align":
        net.load_state_dict(load_stage_state(files["simclr"])["model"])
    return net


def _fresh_source(checkpoint: str) -> nn.Module:
    """The source checkpoint's architecture with fresh (random) weights."""
    info = source_model_info(read_header(checkpoint))
    return build_model(info["model"], info["num_classes"], info["in_channels"], **info["model_kwargs"])


class SimCLRObjective(nn.Module):
    """NT-Xent of the projections of two views; encoder and projector train."""

    def __init__(self, net, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature
        net.classifier.requires_grad_(False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        z = self.net(torch.cat([v1, v2]), head="projector")  # one pass: BN statistics over both views
        loss = nt_xent(*z.chunk(2), temperature=self.temperature)
        return loss, {"loss": loss.detach()}


class AlignObjective(nn.Module):
    """Symmetric InfoNCE between the SSL encoder and the frozen supervised encoder, plus the optional
    feature-matching and SimCLR terms (AlignStageConfig); the encoder trains, and the projector
    when simclr_weight > 0."""

    def __init__(self, net, supervised_encoder: nn.Module, stage: AlignStageConfig, simclr_temperature: float):
        super().__init__()
        self.net, self.stage, self.simclr_temperature = net, stage, simclr_temperature
        net.classifier.requires_grad_(False)
        net.heads.requires_grad_(stage.simclr_weight > 0)
        self.supervised = supervised_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.supervised.eval()  # frozen: its BN keeps the source statistics
        return self

    def forward(self, x: torch.Tensor, v1: torch.Tensor | None = None, v2: torch.Tensor | None = None):
        f_ssl = self.net.encoder(x)
        with torch.no_grad():
            f_sup = self.supervised(x)
        infonce = alignment_loss(f_ssl, f_sup, self.stage.temperature)
        matching = feature_matching_loss(f_ssl, f_sup)
        loss = infonce + self.stage.feature_weight * matching if self.stage.feature_weight else infonce
        metrics = {"infonce": infonce.detach(), "feature_matching": matching.detach(),
                   "cosine": F.cosine_similarity(f_ssl.detach(), f_sup, dim=1).mean(),
                   "norm_ratio": f_ssl.detach().norm(dim=1).mean() / f_sup.norm(dim=1).mean()}
        if self.stage.simclr_weight:
            z = self.net(torch.cat([v1, v2]), head="projector")
            simclr = nt_xent(*z.chunk(2), temperature=self.simclr_temperature)
            loss = loss + self.stage.simclr_weight * simclr
            metrics["simclr"] = simclr.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


class JointObjective(nn.Module):
    """TTT's joint training: classification of the images + rotation prediction of rotated copies."""

    def __init__(self, net, rotation_weight: float):
        super().__init__()
        self.net, self.rotation_weight = net, rotation_weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_rot: torch.Tensor, r: torch.Tensor):
        features = self.net.encoder(torch.cat([x, x_rot]))  # one pass through the shared encoder
        logits = self.net.classifier(features[: len(x)])
        ce = F.cross_entropy(logits, y)
        rot = F.cross_entropy(self.net.heads["rotation"](features[len(x):]), r)
        loss = ce + self.rotation_weight * rot
        accuracy = (logits.detach().argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "rotation": rot.detach(), "accuracy": accuracy}


def build_objective(stage: str, net, cfg: CTATrainConfig, checkpoint: str) -> nn.Module:
    if stage == "simclr":
        return SimCLRObjective(net, cfg.simclr.temperature)
    if stage == "align":
        return AlignObjective(net, split_classifier(load_source_model(checkpoint))[0], cfg.align, cfg.simclr.temperature)
    if stage == "joint":
        return JointObjective(net, cfg.rotation_weight)
    raise ValueError(f"unknown training stage {stage!r}")


def stage_inputs(stage: str, x: torch.Tensor, y: torch.Tensor, cfg: CTATrainConfig,
                 generator: torch.Generator) -> tuple:
    """The objective's inputs for a float batch in [0, 1] (augmentations drawn from `generator`)."""
    flip = trains_with_flips(cfg)
    simclr = SimCLRAugment(crop_scale=tuple(cfg.crop_scale), hflip_prob=0.5 if flip else 0.0)
    if stage == "simclr":
        return simclr.views(x, generator)
    if stage == "align":
        pair = simclr(x, generator) if cfg.align.augment == "simclr" else augment_batch(x, cfg.crop_padding, flip,
                                                                                         generator)
        if cfg.align.simclr_weight:  # + SimCLR's two views of the unaugmented batch
            return (pair, *simclr.views(x, generator))
        return (pair,)
    light = augment_batch(x, cfg.crop_padding, flip, generator)  # the source recipe's crop and flip
    x_rot, r = rotate_batch(light, "rand", generator)
    return light, y, x_rot, r
