"""``exitbench time RESULTS``: re-time stored cells on another device from their saved weights.

Each ok cell of the directory's latest run is rebuilt from its ``config`` and ``weights/<cell>.safetensors``
(no training, no download) and timed at its stored headline operating point on ``--device``; the new
latency records are appended to the result (records of the same device, variant and batch size are
replaced), so a user trains on one machine and times on their deployment target. The timing inputs are
the cell's test split when its dataset is on this machine, else same-shaped seeded random tensors; each
record says which (``inputs``), because exits depend on the inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from exitbench.benchmarks import stages as st
from exitbench.benchmarks import static
from exitbench.benchmarks.config import build_method
from exitbench.benchmarks.data import to_tensors
from exitbench.benchmarks.device import prepare, resolve_device
from exitbench.benchmarks.fast import check_fast
from exitbench.benchmarks.latency import TimingProtocol, num_threads
from exitbench.core.errors import UserError
from exitbench.core.results import CellResult
from exitbench.core.spec import Cell, Evaluation
from exitbench.core.store import latest_run, read_json, safetensors_problem
from exitbench.methods.base import Method

RANDOM_SAMPLES = 256
T = TypeVar("T")


def _inputs(cell: Cell) -> tuple[torch.Tensor, str]:
    """The test split when the data are here, else seeded N(0, 1) tensors of the same shape."""
    try:
        splits = st.prepare_data(cell)
        return to_tensors(splits.test)[0], "test split"
    except UserError:
        info = st.without_data(cell).info
        g = torch.Generator().manual_seed(cell.seed)
        return torch.randn(RANDOM_SAMPLES, *info.input_size, generator=g), "random N(0,1), same shape (seeded)"


def _test_trace(cell: Cell, results_dir: Path):
    """The cell's stored test trace, scaled as its points were chosen (to count the timed decisions that
    differ from it on this device), or None when it is not there."""
    try:
        return st.scale_traces(cell, st.load_traces(results_dir, cell))[0]["test"]
    except Exception:  # absent or unreadable (safetensors raises its own error type): timed without the check
        return None


@dataclass(frozen=True)
class TimeOptions:
    """The ``exitbench time`` options. Each replaces the cell's own setting when given; the batch sizes always
    do (none given: the device's, as a cell without ``latency_batch_sizes``)."""

    batch_sizes: tuple[int, ...] = ()
    repeats: int | None = None
    threads: int | None = None
    fast: str | None = None

    def protocol(self, ev: Evaluation) -> TimingProtocol:
        """The timing protocol of a cell evaluated as ``ev``, with these options."""
        own = TimingProtocol.of(ev)
        return replace(own, enabled=True, batch_sizes=tuple(self.batch_sizes), repeats=self.repeats or own.repeats,
                       threads=self.threads or own.threads, fast=self.fast or own.fast)


def _weights(result: CellResult, results_dir: Path, where: str) -> Path:
    """The cell's saved weights file; a missing or damaged one is a one-line error."""
    weights = results_dir / (result.weights or "")
    if not result.weights or not weights.is_file():
        raise UserError(f"{where}: no saved weights ({weights}); re-time only results written with weights "
                        "(rerun `exitbench run` on this directory first)")
    damaged = safetensors_problem(weights)
    if damaged:
        raise UserError(f"{where}: its saved weights {weights} are damaged ({damaged}); rerun `exitbench run` on this "
                        "directory to recompute the cell, then re-time it")
    return weights


def _method(cell: Cell, where: str) -> Method:
    """The cell's method; one that is not installed here is a one-line error naming the cell."""
    try:
        return build_method(cell)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _rebuilt(where: str, build: Callable[[], T]) -> T:
    """``build()``: the network(s) from the saved weights; weights of another network are a one-line error."""
    try:
        return build()
    except RuntimeError as e:
        raise UserError(f"{where}: the saved weights do not fit the network its config describes "
                        f"({str(e).splitlines()[0][:160]}); were they written by another exitbench?") from None


def retime_cell(result: CellResult, results_dir: Path, device_spec: str, options: TimeOptions = TimeOptions()
                ) -> CellResult | None:
    """``result`` with latency records for ``device_spec`` appended (same device/variant/batch replaced);
    None when the cell has no feasible headline point (nothing was timed when it ran either)."""
    where = f"{result.path or result.cell}"
    cell = result.config
    weights = _weights(result, results_dir, where)
    method = None if cell.static else _method(cell, where)
    head = result.headline()
    if method is not None and (head is None or not head.feasible):
        return None
    device = resolve_device(device_spec)
    protocol = options.protocol(cell.evaluation)
    check_fast(protocol.fast, device, "--fast" if options.fast else f"{where}: evaluation.fast")
    inputs, note = _inputs(cell)
    protocol = replace(protocol, inputs=note)  # every record says what was timed: exits depend on the inputs
    prepare(device)
    with num_threads(protocol.threads):
        if method is None:  # a static baseline: the model alone, timed against its backbones
            model = _rebuilt(where, lambda: static.rebuild(cell, st.without_data(cell), weights, device))
            records = static.time_static(cell, protocol, model, st.without_data(cell), inputs).records
        else:
            backbone, net = _rebuilt(where, lambda: st.rebuild(cell, st.without_data(cell), method, weights, device))
            trace = _test_trace(cell, results_dir) if note == "test split" else None
            strict = [e.rel_macs_strict for e in result.exits]
            records = st.time_latency(protocol, backbone, net, result.operating_points, inputs, strict, trace).records
    new = {(r.device, r.variant, r.batch_size, r.against) for r in records}
    kept = [r for r in result.latency if (r.device, r.variant, r.batch_size, r.against) not in new]
    return replace(result, latency=kept + records)


def retime(results_dir: Path, device_spec: str, options: TimeOptions = TimeOptions()
           ) -> tuple[list[Path], list[Path]]:
    """Re-time every ok cell of the latest run in ``results_dir``; returns (files rewritten, cells left
    alone because they have no feasible operating point to time)."""
    paths, _ = latest_run(results_dir, sorted((results_dir / "cells").glob("*.json")))
    if not paths:
        raise UserError(f"{results_dir}: no result files (expected {results_dir / 'cells'}/*.json)")
    device = resolve_device(device_spec)  # a device that is not there: one line, nothing written
    if options.fast:
        check_fast(options.fast, device, "--fast")
    done, skipped, readable = [], [], 0
    for p in paths:
        try:
            r = CellResult.from_dict(read_json(p), p)
        except (OSError, ValueError) as e:  # a file that is no result (UserError is a ValueError): named, skipped
            print(f"exitbench: warning: skipping {p}: not a readable cell result ({str(e).splitlines()[0][:120]})",
                  file=sys.stderr)
            continue
        readable += 1
        if not r.ok:
            continue
        r.path = str(p)
        new = retime_cell(r, results_dir, device_spec, options)
        if new is None:
            skipped.append(p)
            continue
        st.write_result(p, new)
        done.append(p)
    if not readable:
        raise UserError(f"{results_dir}: no readable cell results in {results_dir / 'cells'}; give the --out of an "
                        "`exitbench run`")
    return done, skipped
