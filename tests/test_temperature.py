"""Per-exit temperature scaling: the fit recovers a known temperature, ECE by hand, the deployed policy
agrees with the offline scaled scores, and a cell run with it records temperatures and ECE before/after."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from exitbench.benchmarks.config import expand
from exitbench.benchmarks.traces import Trace
from exitbench.cli import main
from exitbench.core.errors import UserError
from exitbench.methods.policies import first_exit, make_policy
from exitbench.methods.temperature import ece, fit_temperature, scale


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_fit_recovers_a_known_temperature(t0):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(6000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / t0).softmax(-1), 1, generator=g)[:, 0]  # labels drawn at temperature t0
    assert fit_temperature(z, y) == pytest.approx(t0, rel=0.08)


def test_ece_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    # bin of 0.9: accuracy 1 vs confidence 0.9; bin of 0.6: accuracy 0.5 vs 0.6; each half the samples
    assert ece(p.log(), y, bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    assert ece(p.log(), torch.tensor([0, 0, 0, 0]), bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)


def test_scaling_changes_scores_not_predictions_and_the_policy_follows_it():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 200, 4, generator=g)
    temps = [2.5, 0.7, 1.0]
    tr = Trace(logits, torch.zeros(200, dtype=torch.long))
    sc = tr.scaled(temps)
    assert torch.equal(sc.predictions(), tr.predictions()) and sc.temperatures == temps
    assert torch.allclose(sc.logits, scale(logits, temps))
    thresholds = (0.6, 0.8)
    offline = first_exit(sc.scores("max_softmax"), torch.tensor([thresholds]), strict=False)[0]
    pol = make_policy("max_softmax", thresholds, temperatures=temps[:-1])
    for k in range(2):
        reached = offline >= k
        assert torch.equal(pol.accept(k, logits[k][reached], None), (offline == k)[reached])
    assert not torch.equal(offline, first_exit(tr.scores("max_softmax"), torch.tensor([thresholds]))[0])


MATRIX = {
    "datasets": [{"name": "synthetic", "n": 240, "num_classes": 3, "image_size": 16}],
    "backbones": ["test_resnet"],
    "methods": [{"name": "sdn", "hparams": {"epochs": 2, "n_exits": 2, "placement": "linear"}}],
    "seeds": [0],
    "backbone_training": {"epochs": 2},
    "evaluation": {"latency_batch_sizes": [4], "latency_repeats": 2, "grid_size": 20, "threads": 1},
}


def test_bad_mode_is_a_one_line_error():
    with pytest.raises(UserError, match="evaluation.temperature: unknown mode 'global'; use none, per-exit"):
        expand({**MATRIX, "evaluation": {"temperature": "global"}})


def test_a_cell_with_temperature_scaling(tmp_path):
    off = tmp_path / "off.yaml"
    on = tmp_path / "on.yaml"
    off.write_text(yaml.safe_dump(MATRIX))
    on.write_text(yaml.safe_dump({**MATRIX, "evaluation": {**MATRIX["evaluation"], "temperature": "per-exit"}}))
    args = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(["run", str(off), *args]) == 0
    (path,) = (tmp_path / "out" / "cells").glob("*.json")
    before = json.loads(path.read_text())
    assert "temperature" not in before and all("temperatures" not in p for p in before["operating_points"])
    # turning it on re-analyses the finished cell from its raw traces: nothing is trained
    assert main(["run", str(on), *args]) == 0
    r = json.loads(path.read_text())
    assert r["reanalysed"]["stages"][:2] == ["points", "latency"] and r["finished"] == before["finished"]
    t = r["temperature"]
    assert len(t["temperatures"]) == 3 and all(0 < x < 100 for x in t["temperatures"])
    assert t["fitted_on"] + t["held_out"] == r["data"]["calibration"]
    for side in ("ece_before", "ece_after"):
        assert set(t[side]) == {"calibration_held_out", "test"}
        assert all(0 <= v <= 1 and math.isfinite(v) for vs in t[side].values() for v in vs)
    head = next(p for p in r["operating_points"] if p["headline"])
    assert head["temperatures"] == t["temperatures"][:2]  # the early exits', deployed with the thresholds
    patience = next(p for p in r["operating_points"] if p["kind"] == "patience")
    assert "temperatures" not in patience  # argmaxes only: no temperature changes them
    # accuracies at the final exit are untouched
    assert r["exits"] == before["exits"]
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "rep")]) == 0
    rel = (tmp_path / "rep" / "tables" / "reliability.md").read_text()
    assert "ECE test before" in rel and "exit" in rel
