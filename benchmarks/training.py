"""Shared training loops: the backbone on a cell's dataset, and any method through its loss.

Every method trains through :func:`fit` (``Method.fit``'s default) unless its procedure differs, so
budgets (epochs, optimizer, learning rate, batch size, wall time) mean the same thing for all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from exitbench.benchmarks.device import check_precision
from exitbench.methods.base import OPTIMIZERS, Budget, ExitOutputs, UserError

LossFn = Callable[[Any, Tensor, nn.Module], Tensor]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the cell fails with this message, the run goes on."""


def make_optimizer(params: list[nn.Parameter], budget: Budget) -> torch.optim.Optimizer:
    name = budget.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=budget.lr, betas=budget.betas, weight_decay=budget.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=budget.lr, betas=budget.betas, weight_decay=budget.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=budget.lr, momentum=0.9, nesterov=True, weight_decay=budget.weight_decay)
    raise UserError(f"optimizer: unknown optimizer {budget.optimizer!r}; use {', '.join(OPTIMIZERS)}")


def fit(model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], loaders: dict[str, DataLoader],
        budget: Budget, *, schedule: str = "none") -> dict:
    """Train ``model`` on ``loaders['train']`` for ``budget.epochs`` (or until ``budget.max_seconds``).

    ``loss_fn(model(x), y, model)`` is minimised over ``params``, on the device the model is on (batches
    are moved there), under autocast when ``budget.precision`` is bf16 or fp16 (fp16 with loss scaling).
    ``schedule`` is ``none`` (the reference settings of the methods) or ``cosine``. Returns the stats
    recorded in results.
    """
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    device = params[0].device
    amp = check_precision(budget.precision, device, "precision")
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    opt = make_optimizer(params, budget)
    steps = budget.epochs * len(loaders["train"])
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
             if schedule == "cosine" else None)
    losses: list[float] = []
    start = time.perf_counter()
    stopped_early = False
    for _ in range(budget.epochs):
        model.train()
        # the epoch's loss is summed on the device and read once at its end: a read per step would make
        # the host wait for every step on a GPU
        total, count = torch.zeros((), device=device), 0
        for x, y in loaders["train"]:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = loss_fn(model(x), y, model)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach().float() * len(y)
            count += len(y)
        losses.append(total.item() / max(count, 1))
        if not math.isfinite(losses[-1]):  # nothing sensible can follow: stop the cell, not the run
            raise TrainingDiverged(f"training diverged at epoch {len(losses)} of {budget.epochs}: the mean loss is "
                                   f"{losses[-1]} (lr {budget.lr:g}, {budget.optimizer}); lower the learning rate")
        if budget.max_seconds is not None and time.perf_counter() - start > budget.max_seconds:
            stopped_early = len(losses) < budget.epochs
            break
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "budget": asdict(budget) | {"schedule": schedule},
        "data_path": getattr(loaders["train"], "kind", "DataLoader (batches assembled on the host)"),
        "epochs_run": len(losses),
        "stopped_by_wall_time": stopped_early,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(len(losses), 1),
        "loss_per_epoch": losses,
    }


def method_trainer(net: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], loaders: dict[str, DataLoader],
                   budget: Budget) -> dict:
    """The trainer handed to ``Method.fit``: the shared loop without a schedule (as the references)."""
    return fit(net, loss_fn, params, loaders, budget)


def _cross_entropy(logits: Tensor | ExitOutputs, y: Tensor, model: nn.Module) -> Tensor:
    return nn.functional.cross_entropy(logits, y, label_smoothing=0.1)


def train_backbone(backbone: nn.Module, loaders: dict[str, DataLoader], budget: Budget) -> dict:
    """Train a plain classifier with cross-entropy (label smoothing 0.1) and a cosine schedule."""
    params = [p for p in backbone.parameters() if p.requires_grad]
    return fit(backbone, _cross_entropy, params, loaders, budget, schedule="cosine")


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of a plain classifier over ``images`` in eval mode, computed on the model's device (on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
