"""How much room does the MGTTA benchmark leave an optimizer of the norm affines? Labelled oracles.

MGTTA, Tent, SAR and EATA all adapt the same parameters: the affine weight and bias of
the BN layers, BN on test-batch statistics. This measures, on the stream of the MGTTA
benchmark (Fashion-MNIST-C, 15 corruptions, severity 5, batch 64, episodic: reset per
corruption), what *labels* could get out of those parameters:

- `bn`: no update (every method's starting point);
- `online oracle, lr L`: predict a batch, then one Adam step on its cross-entropy with the
  true labels (the feedback a label-free method only estimates), in stream order; the
  best over `--lrs` is the reference for "an optimizer that knew the answer";
- `in-sample floor`: Adam on the cross-entropy of all the corruption's images, with their
  labels, for `--floor-epochs` epochs, then predict them: the lowest error the norm
  affines can reach on these very images (fitted on them, so no method can go below it).

- `gradient agreement`: at the unadapted (BN) state of every batch, the cosine between the
  gradient of a label-free loss (mean entropy: Tent's and the MGG's input; EATA's weighted entropy
  of its reliable samples) and that of the labelled cross-entropy, over all norm affines, and the share of coordinates where their
  signs agree: what a per-coordinate optimizer (the MGG sees one coordinate's gradient
  history at a time) has to turn into the oracle's step.

The gap BN -> online oracle is what a perfect feedback signal makes of these parameters in
this protocol; the agreement says how much of that signal the entropy gradient carries. Writes benchmarks/results/<--tag>.{json,md}.

    python benchmarks/adaptation_room.py [--num-images 1000] [--lrs 1e-3 1e-2 3e-2]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from metatta.cli import setup_logging
from metatta.config import load_config
from metatta.data.streams import build_stream
from metatta.experiment import experiment_config, load_domains, source_model
from metatta.methods.common import configure_norm_adaptation
from metatta.reporting import benchmark_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


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
    from metatta.losses import reliable_entropy, softmax_entropy
    from metatta.methods.eata import EATAConfig

    factor = EATAConfig().entropy_factor

    def reliable(logits: torch.Tensor) -> torch.Tensor | None:
        return reliable_entropy(logits, factor)

    return {"entropy": lambda logits: softmax_entropy(logits).mean(), "eata_reliable": reliable}


def gradient_agreement(model: torch.nn.Module, stream) -> dict[str, dict[str, dict[str, float]]]:
    """Per label-free loss and domain, means over the domain's batches of cos(grad loss, grad CE)
    and of the share of coordinates with the same sign, at the unadapted state (BN on the batch)."""
    net, params = norm_adapted(model)
    sums: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for x, y, domain in stream:
        logits = net(x)
        flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])  # noqa: E731
        ce = flat(F.cross_entropy(logits, y))
        for name, loss_fn in label_free_losses().items():
            loss = loss_fn(logits)
            if loss is None:
                continue
            g = flat(loss)
            sums.setdefault(name, {}).setdefault(domain, []).append(
                (float(F.cosine_similarity(g, ce, dim=0)), float((torch.sign(g) == torch.sign(ce)).float().mean())))
    return {name: {d: {"cosine": float(np.mean([c for c, _ in v])), "sign_agreement": float(np.mean([a for _, a in v])),
                       "batches": len(v)} for d, v in by_domain.items()}
            for name, by_domain in sums.items()}


def _domain_size(stream, domain: str) -> int:
    return sum(len(s) for s in stream.segments if s.name == domain)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="test images per corruption (<= 10000)")
    parser.add_argument("--lrs", nargs="*", type=float, default=[1e-3, 1e-2, 3e-2], help="online oracle Adam lrs")
    parser.add_argument("--floor-epochs", type=int, default=20, help="0: skip the in-sample floor")
    parser.add_argument("--floor-lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="result name (default: adaptation_room[_n<images>])")
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    data = load_config(ROOT / "configs" / "fmnist_c" / "mgtta.yaml", [f"benchmark.num_images={args.num_images}"])
    cfg = experiment_config(data)
    domains = load_domains(cfg.benchmark)
    model, checkpoint = source_model(cfg.source, torch.device("cpu"))
    stream = build_stream(domains, cfg.stream.setting, cfg.stream.batch_size, seed=cfg.stream.seed)
    if not stream.resets_per_domain:
        raise ValueError("the oracles reset per corruption: the stream must be episodic")

    rows, seconds = {}, {}
    for label, lr in [("bn", None)] + [(f"online oracle, lr {lr:g}", lr) for lr in args.lrs]:
        start = time.perf_counter()
        rows[label] = online_errors(model, stream, lr)
        seconds[label] = time.perf_counter() - start
    if args.floor_epochs:
        label = f"in-sample floor ({args.floor_epochs} epochs, lr {args.floor_lr:g})"
        start = time.perf_counter()
        rows[label] = floor_errors(model, stream, args.floor_epochs, args.floor_lr, cfg.stream.seed)
        seconds[label] = time.perf_counter() - start

    agreement = gradient_agreement(model, stream)
    means = {k: float(np.mean(list(v.values()))) for k, v in rows.items()}
    online = [k for k in rows if k.startswith("online")]
    best_online = min(online, key=means.get) if online else None
    tag = args.tag or ("adaptation_room" if args.num_images == 1000 else f"adaptation_room_n{args.num_images}")
    command = benchmark_command(__file__, argv)
    record = {"command": command, "num_images": args.num_images, "batch_size": cfg.stream.batch_size,
              "setting": cfg.stream.setting, "source_checkpoint": str(checkpoint), "errors": rows, "mean_error": means,
              "seconds": seconds, "best_online_oracle": best_online, "gradient_agreement": agreement,
              "room_bn_to_online_oracle": means["bn"] - means[best_online] if best_online else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1))
    names = list(next(iter(rows.values())))
    lines = [f"Fashion-MNIST-C, severity 5, batch {cfg.stream.batch_size}, episodic, {args.num_images} images per "
             f"corruption; norm affines on batch statistics. Command: `python {' '.join(command)}`", "",
             "| row | " + " | ".join(n[:6] for n in names) + " | mean | seconds |",
             "|---|" + "---:|" * (len(names) + 2)]
    lines += [f"| {k} | " + " | ".join(f"{v[n]:.1f}" for n in names) + f" | {means[k]:.2f} | {seconds[k]:.0f} |"
              for k, v in rows.items()]
    for loss, by_domain in agreement.items():
        cosine = [by_domain[n]["cosine"] if n in by_domain else float("nan") for n in names]
        signs = [by_domain[n]["sign_agreement"] if n in by_domain else float("nan") for n in names]
        lines += [f"| grad. cosine, {loss} vs CE | " + " | ".join(f"{c:.2f}" for c in cosine)
                  + f" | {np.nanmean(cosine):.2f} | |",
                  f"| grad. sign agreement, {loss} vs CE | " + " | ".join(f"{a:.2f}" for a in signs)
                  + f" | {np.nanmean(signs):.2f} | |"]
    if best_online:
        lines += ["", f"Room an optimizer could use with perfect feedback: BN {means['bn']:.2f} -> best online oracle "
                      f"{means[best_online]:.2f} ({best_online}): {record['room_bn_to_online_oracle']:.2f} points."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
