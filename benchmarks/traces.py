"""Traces: every exit's logits and scores for one data split, recorded in one pass, and the offline
evaluation of threshold policies on them (vectorised over a grid of thresholds).

Every sweep, calibration and figure is computed from traces, never by re-running the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from exitbench.methods.base import MultiExitNet
from exitbench.methods.policies import first_exit, score_matrix

TRACE_BATCH = 256  # images per forward when traces are recorded


@dataclass
class Trace:
    """One split's record: ``logits`` [E, N, classes] for E exits (final last), ``confidence``
    [E, N] or None, ``labels`` [N]."""

    logits: Tensor
    labels: Tensor
    confidence: Tensor | None = None
    temperatures: list[float] | None = None  # set when ``logits`` are temperature-scaled (``scaled``)

    def scaled(self, temperatures: list[float]) -> Trace:
        """This trace with exit e's logits divided by ``temperatures[e]`` (predictions unchanged)."""
        from exitbench.methods.temperature import scale

        return Trace(scale(self.logits, temperatures), self.labels, self.confidence, list(temperatures))

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    def __len__(self) -> int:
        return self.logits.shape[1]

    def scores(self, score: str) -> Tensor:
        """[E-1, N] early-exit scores under the named exit score."""
        conf = list(self.confidence) if self.confidence is not None else None
        return score_matrix(score, list(self.logits), conf)

    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)

    def decisions(self, score: str, thresholds: list[float], strict: bool = False) -> tuple[Tensor, Tensor]:
        """(prediction [N], exit index [N]) of every sample under the threshold policy (one threshold per
        early exit): what a deployed network running that policy must give, to compare it with."""
        exit_idx = first_exit(self.scores(score), torch.tensor([thresholds], dtype=torch.float64), strict=strict)[0]
        return self.predictions().gather(0, exit_idx[None])[0], exit_idx

    def save(self, path: str | Path) -> None:
        tensors = {"logits": self.logits.contiguous(), "labels": self.labels.contiguous()}
        if self.confidence is not None:
            tensors["confidence"] = self.confidence.contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        t = load_file(str(path))
        return cls(t["logits"], t["labels"], t.get("confidence"))


@torch.no_grad()
def collect_trace(net: MultiExitNet, images: Tensor, labels: Tensor, batch_size: int = TRACE_BATCH,
                  features: list[list[Tensor]] | None = None) -> Trace:
    """One ``forward_all`` pass over ``images`` in eval mode. ``features`` (from :func:`stage_features` with
    the same ``batch_size``) are the stages' outputs per batch, computed once for every net that shares a
    frozen backbone and its exits: only the exits run then, on exactly the tensors the stages would give."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    logits: list[list[Tensor]] = []
    confs: list[list[Tensor]] = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        if features is None:
            out = net.forward_all(images[start:start + batch_size].to(device))
        else:
            out = net.exits_on([f.to(device) for f in features[i]])
        logits.append([lg.float().cpu() for lg in out.logits])  # traces live on the CPU
        if out.confidence is not None:
            confs.append([c.float().cpu() for c in out.confidence])
    net.train(was_training)
    stacked = torch.stack([torch.cat(col) for col in zip(*logits)])
    conf = torch.stack([torch.cat(col) for col in zip(*confs)]) if confs else None
    return Trace(stacked.cpu(), labels.cpu(), None if conf is None else conf.cpu())


@torch.no_grad()
def stage_features(net: MultiExitNet, images: Tensor, batch_size: int = TRACE_BATCH) -> list[list[Tensor]]:
    """The stages' outputs on ``images``, per batch of ``batch_size``, in eval mode, on the net's device."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [net.stage_outputs(images[start:start + batch_size].to(device))
           for start in range(0, len(images), batch_size)]
    net.train(was_training)
    return out


@dataclass
class Sweep:
    """Metrics of a policy per threshold setting (arrays over G settings)."""

    thresholds: Tensor  # [G] shared or [G, K] per exit
    accuracy: Tensor  # [G]
    agreement: Tensor  # [G] with the final exit's prediction
    exit_fractions: Tensor  # [G, E]
    rel_macs_strict: Tensor  # [G], expected MACs / backbone MACs
    rel_macs_paper: Tensor  # [G]


def evaluate(trace: Trace, score: str, thresholds: Tensor, strict: list[float], paper: list[float],
             exit_strict: bool = False) -> Sweep:
    """Evaluate the threshold policy for every setting in ``thresholds`` on ``trace`` at once.

    ``strict`` and ``paper`` are the relative cost of leaving at each exit (E values) under the two
    accountings; expected relative MACs are the exit fractions weighted by them. A sample leaves at
    the first exit with score >= threshold (> with ``exit_strict``, the rule of EENet's/PTEENet's tau).
    """
    exit_idx = first_exit(trace.scores(score), thresholds, strict=exit_strict)  # [G, N]
    preds = trace.predictions()  # [E, N]
    chosen = preds.gather(0, exit_idx)  # [G, N]: prediction at the chosen exit
    fractions = torch.nn.functional.one_hot(exit_idx, trace.num_exits).double().mean(1)  # [G, E]
    return Sweep(
        thresholds=thresholds,
        accuracy=(chosen == trace.labels[None]).double().mean(1),
        agreement=(chosen == preds[-1][None]).double().mean(1),
        exit_fractions=fractions,
        rel_macs_strict=fractions @ torch.tensor(strict, dtype=torch.float64),
        rel_macs_paper=fractions @ torch.tensor(paper, dtype=torch.float64),
    )
