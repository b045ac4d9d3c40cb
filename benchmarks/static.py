"""Static baselines: a plain timm model from the matrix's ``baselines``, trained like the backbones, no exits.

A static cell shares the first stages of an early-exit cell: prepare the data, prepare the model as a
backbone (``weights: train`` trains it with the matrix's ``backbone_training`` recipe on the same split and
seed, and caches it, so a model that is also a backbone elsewhere is trained once), record its one exit's
traces and save its weights. It then times the model side by side with each backbone it is ``next_to``
(:func:`exitbench.benchmarks.latency.measure_static`): a paired ratio measured in one run, like every other
ratio exitbench reports. Its result is a :class:`CellResult` with method ``static``: one exit row, no sweep,
no operating points; accuracy and MACs in ``backbone``; latency records of variant ``static`` that name the
backbone they are ``against``. Reports put it on the panels of those backbones (docs/baselines.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from exitbench.benchmarks import stages as st
from exitbench.benchmarks.data import Splits
from exitbench.benchmarks.device import check_dtype, in_dtype
from exitbench.benchmarks.latency import Measured, TimingProtocol, measure_static
from exitbench.core.results import CellResult, ExitRow
from exitbench.core.spec import Cell
from exitbench.methods.base import MultiExitNet, StagedBackbone


def as_net(model: StagedBackbone) -> MultiExitNet:
    """The model as a net with no early exit: traces, weights files and re-building then work as for any cell."""
    return MultiExitNet(model, [], [])


def references(cell: Cell, splits: Splits | st.NoData) -> dict[str, StagedBackbone]:
    """The backbones the baseline is next to, architecture only (timing does not depend on weights), built
    as the matrix builds them (their own small_stem) for the cell's dataset."""
    out = {}
    for name, stem in cell.next_to:
        torch.manual_seed(cell.seed)
        out[name] = st.make_backbone(replace(cell, backbone=name, small_stem=stem, weights="train"), splits,
                                     weights=False).eval()
    return out


def time_static(cell: Cell, protocol: TimingProtocol, model: StagedBackbone, splits: Splits | st.NoData,
                test_x: Tensor) -> Measured:
    """The model timed against each of the cell's ``next_to`` backbones under ``protocol``, on the model's
    device, in the protocol's dtype (the fast path is for exits: a static model is timed eager)."""
    if not (protocol.enabled and cell.next_to):
        return Measured([], [])
    device = next(model.parameters()).device
    refs = references(cell, splits)
    dtype = check_dtype(model, test_x, protocol.dtype, device)
    return measure_static(in_dtype(model, device, dtype), {n: in_dtype(r, device, dtype) for n, r in refs.items()},
                          test_x.to(device, dtype), model.macs, {n: r.macs for n, r in refs.items()}, protocol)


def rebuild(cell: Cell, splits: Splits | st.NoData, weights: Path, device: torch.device) -> StagedBackbone:
    """The trained model from its saved weights, in eval mode on ``device``. Nothing is trained."""
    from safetensors.torch import load_model

    torch.manual_seed(cell.seed)
    model = st.make_backbone(cell, splits, weights=False)
    load_model(as_net(model), str(weights), strict=True)  # safetensors: no pickle, nothing executed
    return model.to(device).eval()


def run(cell: Cell, splits: Splits, ref: st.Reference, out_dir: Path, test_x: Tensor, seconds: float) -> CellResult:
    """The static cell after its shared stages (``ref``: the model, prepared as a backbone): traces, weights,
    timing and the result. ``seconds``: the time its shared stages took."""
    start = time.perf_counter()
    model, net = ref.backbone, as_net(ref.backbone)
    traces = st.record_traces(net, splits)
    st.save_artifacts(out_dir, cell, traces, net)
    timing = time_static(cell, TimingProtocol.of(cell.evaluation), model, splits, test_x)
    final = ExitRow("final", len(model.blocks) - 1, model.macs, model.head_macs, 1.0, 1.0, ref.calibration_accuracy,
                    ref.test_accuracy)
    return CellResult(**st.result_fields(cell, splits, ref, cell, next(model.parameters()).device),
                      exits=[final], latency=timing.records, latency_notes=timing.notes,
                      seconds=seconds + st.elapsed(start))
