"""`exitbench plan`: cell states in a results directory, backbones to train first, and the estimate's
arithmetic (MACs x samples x epochs / a throughput measured here)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from exitbench.benchmarks import plan
from exitbench.benchmarks.config import expand
from exitbench.benchmarks.data import load_splits
from exitbench.benchmarks.runner import cell_path, claim_path
from exitbench.cli import main
from exitbench.core.claims import try_claim
from exitbench.core.results import CellResult
from tests.test_runner import TINY, _write

RATE = 1e9  # MAC/s, instead of a measurement, so that the arithmetic can be checked


def test_estimates_follow_macs_samples_and_epochs(tmp_path):
    cells = expand(TINY)
    plans = plan.plan_cells(cells, None, tmp_path / "cache", RATE)
    train, cal, test = plan._split_sizes(cells[0])
    assert (train, cal, test) == (112 - 12, 12, 48)  # synthetic n=160: 30 % test, then 10 % of the rest (rounded up)
    real = load_splits("synthetic", **cells[0].dataset_options)  # what the run will really use
    assert (len(real.train), len(real.calibration), len(real.test)) == (train, cal, test)
    first, second = plans
    macs = first.macs
    assert first.backbone_s == pytest.approx(3 * macs * train * 2 / RATE)  # backbone_training.epochs = 2
    assert second.backbone_s == 0  # the same backbone: trained once, charged to the first cell needing it
    assert first.method_s == pytest.approx(1 * macs * train * 2 / RATE)  # PTEENet: frozen backbone, 2 epochs
    assert first.traces_s == pytest.approx(macs * (cal + test) / RATE)
    variants = len({"backbone", *cells[0].evaluation.timed_variants})
    assert first.latency_s == pytest.approx(variants * (2 + 2) * (32 + 16) * macs / RATE)
    assert {p.state for p in plans} == {"pending"}


def test_states_in_a_results_directory(tmp_path):
    cells = expand(TINY)
    out = tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    failed = CellResult("error", cells[0].slug(), cells[0], error="boom")
    cell_path(out, cells[0]).write_text(json.dumps(failed.to_dict()))
    claim = try_claim(claim_path(out / "claims", cells[1]))
    try:
        states = [(p.state, p.who) for p in plan.plan_cells(cells, out, tmp_path / "cache", RATE)]
    finally:
        claim.release()
    assert states[0] == ("failed", None) and states[1][0] == "running"
    assert states[1][1].endswith(f":{os.getpid()}")  # host:pid of the runner holding the claim


def test_plan_prints_the_matrix_size_and_an_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan, "measure_throughput", lambda device, seconds=3.0: RATE)
    assert main(["plan", _write(tmp_path, TINY), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "matrix 'm': 2 cells" in out and "backbones to train first (1): synthetic test_resnet seed 0 (" in out
    assert "an estimate, not a measurement" in out and "1.0 G training MAC/s" in out
    assert out.count("pending") == 2 and "total:" in out


def test_the_throughput_is_measured_on_the_device():
    rate = plan.measure_throughput(torch.device("cpu"), seconds=0.2)
    assert 1e6 < rate < 1e15  # MAC/s of a real training step, whatever this machine is


def test_rate_measured_times_each_network_of_the_matrix(tmp_path, capsys):
    cells = expand(TINY)
    rates = plan.measure_model_rates(cells, torch.device("cpu"), seconds=0.1)
    assert len(rates) == len({(c.backbone, c.small_stem) for c in cells}) and all(r > 0 for r in rates.values())
    plans = plan.plan_cells(cells, None, tmp_path / "cache", rates)
    key = plan._model_key(cells[0])
    train = plan._split_sizes(cells[0])[0]
    assert plans[0].backbone_s == pytest.approx(3 * plans[0].macs * train * 2 / rates[key])
    assert main(["plan", _write(tmp_path, TINY), "--rate", "measured"]) == 0
    assert "each network's own training steps measured on cpu" in capsys.readouterr().out
    for bad in ("fast", "0", "-1e9", "inf"):
        assert main(["plan", _write(tmp_path, TINY), f"--rate={bad}"]) == 2
        assert "--rate: expected a positive number of training MAC/s" in capsys.readouterr().err
