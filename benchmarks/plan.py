"""``exitbench plan``: what a matrix will cost and how far a results directory has got.

For every cell: its state in the results directory (``done``, ``re-analyse``, ``failed``, ``running`` --
claimed by a live runner -- or ``pending``), and an **estimated** cost. The estimate is arithmetic, not a
measurement: the backbone's MACs (batch 1, counted by exitbench) x the samples each stage sees x its
epochs, divided by a training throughput in MAC/s measured on this device in a few seconds (a ResNet-20
training step on CIFAR-sized batches; a backward pass counts as two forwards), or given by ``--rate``, or
(``--rate measured``) each network's own, from two seconds of its training steps at the matrix's batch size
and precision on the device. The stages counted:

- training the backbone (``weights: train``), once per distinct cache entry, charged to the first cell
  that needs it, and only when the cache does not hold it yet;
- training the method: 3 x MACs per sample and epoch when it trains the backbone, 1 x (the frozen
  backbone's forward; heads are small) otherwise;
- recording traces on the calibration and test splits (1 x MACs per sample);
- timing: every latency variant, warm-ups and repeats, at batch 1 (32 samples) and the large batches;
- a static baseline: its training as a backbone, its traces, and its timing in pairs with each backbone
  it is next to (no method to train).

The real time also depends on data loading, the device's efficiency on each network, and early stopping
by ``max_seconds``; compare the estimate with a finished cell's ``seconds`` before planning GPU-days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exitbench.benchmarks import stages as st
from exitbench.benchmarks.config import build_method
from exitbench.benchmarks.data import CALIBRATION_FRACTION, TEST_FRACTION, split_sizes
from exitbench.benchmarks.latency import default_batch_sizes
from exitbench.benchmarks.runner import cell_path, claim_path, existing, reusable
from exitbench.core.claims import held_live, holder
from exitbench.core.spec import Cell

TRAIN_FACTOR = 3.0  # a training step's MACs per sample: forward + backward (about two forwards)


@dataclass
class CellPlan:
    """One cell's state and estimated seconds (``estimate_s`` splits into its parts)."""

    cell: Cell
    state: str
    who: str | None
    macs: int
    backbone_s: float
    method_s: float
    traces_s: float
    latency_s: float

    @property
    def estimate_s(self) -> float:
        return self.backbone_s + self.method_s + self.traces_s + self.latency_s


def measure_throughput(device: torch.device, seconds: float = 3.0) -> float:
    """Training MAC/s on ``device``: ResNet-20 (CIFAR) steps at batch 64 for about ``seconds``."""
    from exitbench.benchmarks.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone("cifar_resnet20", 10, (3, 32, 32)).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    return TRAIN_FACTOR * net.macs * _images_per_second(net, opt, x, y, None, device, seconds)


def _split_sizes(cell: Cell) -> tuple[int, int, int]:
    """(train, calibration, test) sample counts the cell will use, from the dataset's known sizes."""
    opts = cell.dataset_options
    train, cal, test = split_sizes(st.without_data(cell).info, opts.get("calibration_fraction", CALIBRATION_FRACTION),
                                   opts.get("test_fraction", TEST_FRACTION))
    return min(train, opts.get("train_subset") or train), cal, test


def _state(cell: Cell, out_dir: Path | None, claims_dir: Path | None) -> tuple[str, str | None]:
    if out_dir is None:
        return "pending", None
    r = existing(cell_path(out_dir, cell))
    if r is not None and r.ok:
        return ("done" if reusable(r, cell, out_dir) == "reuse" else "re-analyse"), None
    lock = claim_path(claims_dir or out_dir / "claims", cell)
    if held_live(lock):
        return "running", holder(lock)
    return ("failed" if r is not None else "pending"), None


def _model_key(cell: Cell) -> tuple:
    return (cell.backbone, cell.small_stem, cell.dataset, tuple(sorted(cell.dataset_options.items())))


def measure_model_rates(cells: list[Cell], device: torch.device, seconds: float = 2.0) -> dict[tuple, float]:
    """``--rate measured``: per network of the matrix (backbone or static model, per dataset shape), its own
    training throughput on ``device``, as effective MAC/s (3 x its MACs x images/s): about ``seconds`` of
    training steps at the matrix's backbone batch size and precision, on random inputs of the dataset's
    shape. Depthwise and attention networks, which run below a device's MAC rate, are then estimated at their
    own speed instead of ResNet-20's."""
    from exitbench.benchmarks.device import check_precision

    rates: dict[tuple, float] = {}
    for cell in cells:
        key = _model_key(cell)
        if key in rates:
            continue
        info = st.without_data(cell).info
        torch.manual_seed(0)
        net = st.make_backbone(cell, st.without_data(cell), weights=False).to(device).train()
        recipe = cell.backbone_training
        amp = check_precision(recipe.precision, device, "backbone_training.precision")
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        b = recipe.batch_size
        x = torch.randn(b, *info.input_size, device=device)
        y = torch.randint(0, info.num_classes, (b,), device=device)
        rates[key] = TRAIN_FACTOR * net.macs * _images_per_second(net, opt, x, y, amp, device, seconds)
    return rates


def _images_per_second(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       amp: torch.dtype | None, device: torch.device, seconds: float) -> float:
    from contextlib import nullcontext

    def step() -> None:
        with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up
    sync()
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds or steps < 2:
        step()
        steps += 1
    sync()
    return len(x) * steps / (time.perf_counter() - began)


def plan_cells(cells: list[Cell], out_dir: Path | None, cache_dir: Path, throughput: float | dict[tuple, float],
               claims_dir: Path | None = None) -> list[CellPlan]:
    """Every cell's state in ``out_dir`` and its estimate at ``throughput`` training MAC/s: one rate for
    every network, or one per network (:func:`measure_model_rates`)."""
    plans, built, charged = [], {}, set()
    for cell in cells:
        train, cal, test = _split_sizes(cell)
        splits = st.without_data(cell)
        key = _model_key(cell)
        if key not in built:
            built[key] = st.make_backbone(cell, splits, weights=False)
        backbone = built[key]
        macs = int(backbone.macs)
        rate = throughput[key] if isinstance(throughput, dict) else throughput
        state, who = _state(cell, out_dir, claims_dir)
        backbone_s = 0.0
        if cell.weights == "train":
            cache = st.backbone_cache_path(cell, backbone, cache_dir)
            if cache not in charged and not cache.exists():
                charged.add(cache)
                backbone_s = TRAIN_FACTOR * macs * train * cell.backbone_training.epochs / rate
        ev = cell.evaluation
        sizes = ev.latency_batch_sizes or default_batch_sizes(torch.device("cpu"))
        timed = (ev.latency_repeats + 2) * sum(min(32, test) if b == 1 else b for b in sizes) if ev.latency else 0
        if cell.static:  # nothing to fit; timed in pairs with each backbone it is next to
            method_s = 0.0
            refs = [built.get((name, stem, cell.dataset, key[3])) for name, stem in cell.next_to]
            timed_macs = sum(macs + (r.macs if r is not None else macs) for r in refs)
        else:
            method = build_method(cell)
            epochs = int(method.hp.get("epochs", 1))
            factor = TRAIN_FACTOR if cell.regime != "disjoint" else 1.0
            method_s = factor * macs * train * epochs / rate
            timed_macs = len({"backbone", *ev.timed_variants}) * macs
        traces_s = macs * (cal + test) / rate
        latency_s = timed * timed_macs / rate
        plans.append(CellPlan(cell, state, who, macs, backbone_s, method_s, traces_s, latency_s))
    return plans
