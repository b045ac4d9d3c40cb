"""Shared training loops: the backbone on a cell's dataset, and any method through its loss.

Every method trains through :func:`fit` (``Method.fit``'s default) unless its procedure differs, so
budgets (epochs, optimizer, learning rate, batch size, wall time) mean the same thing for all of them.

Inside :func:`resumable`, ``fit`` saves an epoch checkpoint (model, optimiser, schedule, loss scaler, the
loss's own state, torch's and the loader's random generators) after every epoch whose saving costs at most
``CHECKPOINT_OVERHEAD`` of the training time since the last one (every epoch for small models; about every
ten save-times for large ones), and resumes from it when the same call runs again: a preempted task loses
the epochs since then, and the resumed run ends with the weights an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from exitbench.benchmarks.device import check_precision
from exitbench.core.store import write_atomic
from exitbench.methods.base import OPTIMIZERS, Budget, ExitOutputs, UserError

LossFn = Callable[[Any, Tensor, nn.Module], Tensor]
CHECKPOINT_OVERHEAD = 0.1  # the most of the training time that epoch checkpoints may take
_checkpoints: ContextVar[list | None] = ContextVar("checkpoints", default=None)  # [folder, next fit call]


@contextmanager
def resumable(folder: Path) -> Iterator[None]:
    """``fit`` calls inside checkpoint into ``folder`` (``fit-<i>.pt`` for the i-th call) and resume from it;
    the caller removes the folder once the work is stored."""
    token = _checkpoints.set([Path(folder), 0])
    try:
        yield
    finally:
        _checkpoints.reset(token)


def _checkpoint_path() -> Path | None:
    c = _checkpoints.get()
    if c is None:
        return None
    c[1] += 1
    return c[0] / f"fit-{c[1] - 1}.pt"


def _signature(model: nn.Module, budget: Budget, params: list[nn.Parameter]) -> str:
    """What a checkpoint must match to be resumed: the model's tensors' names and shapes, the trained
    parameters' shapes and the budget (another method's or another budget's checkpoint is never loaded)."""
    what = [sorted((k, list(v.shape)) for k, v in model.state_dict().items()), [list(p.shape) for p in params],
            repr(asdict(budget))]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _save_checkpoint(path: Path, parts: dict[str, Any], losses: list[float], seconds: float, sig: str,
                     generator: torch.Generator | None, device: torch.device) -> None:
    state = {name: obj.state_dict() for name, obj in parts.items() if hasattr(obj, "state_dict")}
    state |= {"losses": losses, "seconds": seconds, "signature": sig, "rng": torch.get_rng_state(),
              "saved_at": time.time()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _resume(path: Path, parts: dict[str, Any], sig: str, generator: torch.Generator | None,
            device: torch.device) -> tuple[list[float], float] | None:
    """Load the checkpoint at ``path`` into ``parts``; its losses and seconds, or None to start afresh."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("signature") != sig:
            return None
        for name, obj in parts.items():
            if name in state:
                obj.load_state_dict(state[name])
        torch.set_rng_state(state["rng"])
        if generator is not None and "generator" in state:
            generator.set_state(state["generator"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        # the times (Unix seconds) let a log reader measure what a preemption cost (docs/slurm.md)
        print(f"exitbench: resumed training at epoch {len(state['losses'])} at {time.time():.1f} from a checkpoint "
              f"saved at {float(state['saved_at']):.1f}", flush=True)
        return list(state["losses"]), float(state["seconds"])
    except Exception as e:  # a damaged checkpoint costs its epochs, never the cell
        print(f"exitbench: ignoring the training checkpoint {path} ({type(e).__name__}: {e})", flush=True)
        return None


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
    # everything whose state the next epoch depends on, for the epoch checkpoint
    parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "loss_fn": loss_fn}
    parts = {k: v for k, v in parts.items() if v is not None and hasattr(v, "load_state_dict")}
    generator = getattr(loaders["train"], "generator", None)
    ckpt = _checkpoint_path()
    sig = _signature(model, budget, params) if ckpt else ""
    resumed = _resume(ckpt, parts, sig, generator, device) if ckpt else None
    losses, before = resumed or ([], 0.0)
    resumed_at = len(losses) if resumed else None
    start = time.perf_counter() - before
    saved, save_cost = time.perf_counter(), 0.0
    stopped_early = False
    for _ in range(len(losses), budget.epochs):
        losses.append(_epoch(model, loss_fn, loaders["train"], device, autocast, opt, scaler, sched))
        if not math.isfinite(losses[-1]):  # nothing sensible can follow: stop the cell, not the run
            raise TrainingDiverged(f"training diverged at epoch {len(losses)} of {budget.epochs}: the mean loss is "
                                   f"{losses[-1]} (lr {budget.lr:g}, {budget.optimizer}); lower the learning rate")
        if budget.max_seconds is not None and time.perf_counter() - start > budget.max_seconds:
            stopped_early = len(losses) < budget.epochs
            break
        if ckpt and len(losses) < budget.epochs and time.perf_counter() - saved >= save_cost / CHECKPOINT_OVERHEAD:
            t = time.perf_counter()
            _save_checkpoint(ckpt, parts, losses, t - start, sig, generator, device)
            saved = time.perf_counter()
            save_cost = saved - t
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
        **({"resumed_at_epoch": resumed_at} if resumed else {}),
    }


def _epoch(model: nn.Module, loss_fn: LossFn, loader: DataLoader, device: torch.device, autocast: Callable,
           opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, sched: Any) -> float:
    """One epoch of training steps; returns its mean loss over samples."""
    model.train()
    # the epoch's loss is summed on the device and read once at its end: a read per step would make the host
    # wait for every step on a GPU
    total, count = torch.zeros((), device=device), 0
    for x, y in loader:
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
    return total.item() / max(count, 1)


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
