"""Does CTA's aligned SSL encoder stand in for the supervised one? Diagnostics without adaptation.

CTA predicts with the frozen supervised classifier reading the SSL encoder's features. These
functions read both encoders on the same images and report, for the SSL encoder and the
supervised one, the classifier's error and mean confidence, and how well their pooled features
agree (`feature_agreement`: cosine, retrieval, norm ratio). Both encoders' BN layers normalize
with one of `STATISTICS`:

- "batch": the statistics of each test batch (as CTA predicts, and the BN baseline);
- "source": each encoder's own running buffers from training (the supervised encoder's are the
  source model's: the Source baseline; the SSL encoder's were accumulated during SimCLR and
  alignment on clean training images).

`benchmarks/cta.py` (`encoder_modes`) and `benchmarks/cta_sweep.py` report them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from metatta.methods.common import use_batch_statistics
from metatta.models import load_source_model
from metatta.ssl.align import feature_agreement
from metatta.ssl.networks import load_network, split_classifier

STATISTICS = ("batch", "source")
BATCH = 200  # images per forward; with "batch" statistics, the test batch whose statistics are used


@torch.no_grad()
def encoder_diagnostics(net, supervised: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                        scale: float = 1.0, statistics: str = "batch") -> dict:
    """Frozen classifier on the SSL encoder (its features times `scale`) vs the supervised encoder,
    both normalizing with `statistics` (one of `STATISTICS`)."""
    if statistics not in STATISTICS:
        raise ValueError(f"encoder_diagnostics: statistics must be one of {STATISTICS}, got {statistics!r}")
    ssl_enc, sup_enc = copy.deepcopy(net.encoder).eval(), copy.deepcopy(supervised).eval()
    if statistics == "batch":
        use_batch_statistics(ssl_enc)
        use_batch_statistics(sup_enc)
    f_ssl, f_sup = [], []
    for start in range(0, len(images), BATCH):
        x = torch.from_numpy(images[start:start + BATCH]).permute(0, 3, 1, 2).float().div_(255)
        f_ssl.append(ssl_enc(x))
        f_sup.append(sup_enc(x))
    f_ssl, f_sup = scale * torch.cat(f_ssl), torch.cat(f_sup)
    y = torch.from_numpy(np.asarray(labels))
    out = feature_agreement(f_ssl, f_sup)
    for who, f in (("ssl", f_ssl), ("sup", f_sup)):
        p = net.classifier(f).softmax(1)
        out[f"{who}_error"] = 100 * float((p.argmax(1) != y).float().mean())
        out[f"{who}_confidence"] = 100 * float(p.max(1).values.mean())
    return out


def domains_diagnostics(net, supervised, domains, scale: float = 1.0, statistics: str = "batch") -> dict:
    """encoder_diagnostics per domain, averaged over the domains."""
    per = [encoder_diagnostics(net, supervised, d.images, d.labels, scale, statistics) for d in domains]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


def encoder_modes(cta_adapter: str | Path, domains) -> dict[str, float]:
    """Mean error over `domains` of the frozen classifier on a CTA adapter's SSL encoder (`ssl_*`) and on
    the supervised encoder of its source model (`sup_*`), with each of `STATISTICS`, no adaptation."""
    net, info = load_network(cta_adapter, kind="cta")
    supervised = split_classifier(load_source_model(info["source_checkpoint"]))[0]
    out = {}
    for statistics in STATISTICS:
        d = domains_diagnostics(net, supervised, domains, statistics=statistics)
        out[f"ssl_{statistics}"], out[f"sup_{statistics}"] = d["ssl_error"], d["sup_error"]
    return out
