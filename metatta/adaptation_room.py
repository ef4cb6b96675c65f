"""The adaptation room of a stream: how far labels could take the parameters TTA methods adapt.

Tent, SAR, EATA and MGTTA all adapt the same parameters: the affine weight and bias of the
BN layers, with BN on test-batch statistics. This analysis asks what *labelled* feedback
makes of those parameters on a stream, so that a label-free method (or a learned optimizer)
can be placed between "no update" and "perfect feedback":

- `online_errors(model, stream, None)`: BN, no update (every method's starting point);
- `online_errors(model, stream, lr)`: the online oracle: predict a batch, then one Adam step
  on its cross-entropy with the true labels, in stream order;
- `floor_errors`: the in-sample floor: Adam on the cross-entropy of all of a domain's
  labelled images, then predict them (fitted on them, so no method can go below it);
- `gradient_agreement`: at the unadapted state of every batch, the cosine and the sign
  agreement between the gradient of a label-free loss (`label_free_losses`) and that of the
  labelled cross-entropy: how much of the oracle's signal the label-free gradient carries.

The stream is episodic: every function resets to the source model at each domain. The source
model is never modified (each domain adapts a copy, `norm_adapted`).
`benchmarks/adaptation_room.py` runs it on the MGTTA benchmark's stream.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from metatta.learned.losses import TTALoss, record_features, stats_alignment_loss
from metatta.losses import reliable_entropy, softmax_entropy
from metatta.methods.common import configure_norm_adaptation
from metatta.methods.eata import EATAConfig


def norm_adapted(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A copy of the source model set up as every compared method adapts it."""
    model = copy.deepcopy(model)
    return model, configure_norm_adaptation(model)


def online_errors(model: torch.nn.Module, stream, lr: float | None) -> dict[str, float]:
    """Error (%) per domain of predict-then-update on the labelled stream (lr None: BN, no update);
    reset to the source model at every domain (the stream is episodic)."""
    wrong: dict[str, list[int]] = {}
    net, params, optimizer, current = None, None, None, None
    for x, y, domain in stream:
        if domain != current:
            net, params = norm_adapted(model)
            optimizer = torch.optim.Adam(params, lr=lr) if lr is not None else None
            current = domain
        logits = net(x)
        wrong.setdefault(domain, []).append(int((logits.argmax(1) != y).sum()))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            optimizer.step()
    return {d: 100.0 * sum(w) / _domain_size(stream, d) for d, w in wrong.items()}


def floor_errors(model: torch.nn.Module, stream, epochs: int, lr: float, seed: int) -> dict[str, float]:
    """Error (%) per domain after fitting the norm affines to all of that domain's labelled
    images (the stream's batches, shuffled each epoch), predicted in the stream's batches."""
    batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for x, y, domain in stream:
        batches.setdefault(domain, []).append((x, y))
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for domain, pairs in batches.items():
        net, params = norm_adapted(model)
        optimizer = torch.optim.Adam(params, lr=lr)
        xs, ys = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
        size = pairs[0][0].shape[0]
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=generator)
            for start in range(0, len(xs), size):
                idx = order[start:start + size]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(xs[idx]), ys[idx]).backward()
                optimizer.step()
        with torch.no_grad():
            wrong = sum(int((net(x).argmax(1) != y).sum()) for x, y in pairs)
        errors[domain] = 100.0 * wrong / len(xs)
    return errors


def label_free_losses() -> dict[str, Callable[[torch.Tensor], torch.Tensor | None]]:
    """The label-free losses whose gradients are compared with the labelled one: Tent's (and the
    MGG's input) mean entropy, and EATA's entropy term on its reliable samples (H < 0.4 ln C, weighted
    by 1 / exp(H - E0); its redundancy filter and Fisher term left out). None: no reliable sample."""
    factor = EATAConfig().entropy_factor

    def reliable(logits: torch.Tensor) -> torch.Tensor | None:
        return reliable_entropy(logits, factor)

    return {"entropy": lambda logits: softmax_entropy(logits).mean(), "eata_reliable": reliable}


def feature_losses(source_stats: Mapping[str, torch.Tensor],
                   stats_lambda: float = 0.4) -> dict[str, Callable[[torch.Tensor, list], torch.Tensor]]:
    """The label-free losses that also read the model's feature taps: MGTTA's ViT loss (entropy +
    0.4 x the CLS token's mean/std alignment to the clean statistics) and that alignment alone."""
    mgtta = TTALoss("entropy+stats", source_stats=source_stats, stats_lambda=stats_lambda)
    return {"entropy+stats": lambda logits, features: mgtta(logits, features),
            "stats": lambda logits, features: stats_alignment_loss(features, source_stats)}


def gradient_agreement(model: torch.nn.Module, stream, source_stats: Mapping[str, torch.Tensor] | None = None
                       ) -> dict[str, dict[str, dict[str, float]]]:
    """Per label-free loss and domain, means over the domain's batches of cos(grad loss, grad CE)
    and of the share of coordinates with the same sign, at the unadapted state (BN on the batch).
    With `source_stats` (clean feature statistics), also the losses of `feature_losses`."""
    net, params = norm_adapted(model)
    with_features = feature_losses(source_stats) if source_stats else {}
    sums: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for x, y, domain in stream:
        with record_features(net, enabled=bool(with_features)) as recorder:
            logits = net(x)
        features = list(recorder.features)
        flat = functools.partial(_flat_gradient, params=params)
        ce = flat(F.cross_entropy(logits, y))
        losses = {**label_free_losses(), **{name: functools.partial(fn, features=features)
                                            for name, fn in with_features.items()}}
        for name, loss_fn in losses.items():
            loss = loss_fn(logits)
            if loss is None:
                continue
            g = flat(loss)
            sums.setdefault(name, {}).setdefault(domain, []).append(
                (float(F.cosine_similarity(g, ce, dim=0)), float((torch.sign(g) == torch.sign(ce)).float().mean())))
    return {name: {d: {"cosine": float(np.mean([c for c, _ in v])), "sign_agreement": float(np.mean([a for _, a in v])),
                       "batches": len(v)} for d, v in by_domain.items()}
            for name, by_domain in sums.items()}


def _flat_gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d params as one vector; zeros for a parameter the loss does not reach (the alignment
    term's taps come before a ViT's final norm)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def _domain_size(stream, domain: str) -> int:
    return sum(len(s) for s in stream.segments if s.name == domain)
