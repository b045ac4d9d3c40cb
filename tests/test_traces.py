"""Offline policy evaluation on traces: vectorised, and equal to a brute-force loop."""

from __future__ import annotations

import torch

from exitbench.benchmarks.traces import Trace, evaluate
from exitbench.methods.calibration import quantile_grid
from exitbench.methods.policies import first_exit, max_softmax, neg_entropy


def _brute_first_exit(scores, thresholds):
    k, n = scores.shape
    out = torch.full((n,), k)
    for j in range(n):
        for e in range(k):
            if scores[e, j] >= thresholds[e]:
                out[j] = e
                break
    return out


def test_first_exit_matches_a_loop_for_shared_and_per_exit_thresholds():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 50, generator=g)
    per_exit = torch.rand(7, 3, generator=g)
    got = first_exit(scores, per_exit)
    for i in range(7):
        assert torch.equal(got[i], _brute_first_exit(scores, per_exit[i]))
    shared = torch.tensor([0.0, 0.5, float("inf")])
    got = first_exit(scores, shared)
    assert torch.all(got[0] == 0) and torch.all(got[2] == 3)
    assert torch.equal(got[1], _brute_first_exit(scores, [0.5] * 3))


def test_scores():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    assert torch.allclose(max_softmax(logits), torch.tensor([0.5, 1.0]))
    assert torch.allclose(neg_entropy(logits), torch.tensor([-0.6931472, 0.0]), atol=1e-6)


def _trace(n=200, exits=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(exits, n, classes, generator=g)
    logits[-1, torch.arange(n), labels] += 3.0  # the final exit is good
    return Trace(logits, labels)


def test_evaluate_metrics_and_cost_accountings():
    tr = _trace()
    strict, paper = [0.3, 0.7, 1.15], [0.25, 0.6, 1.0]
    grid = torch.tensor([-1.0, 0.6, float("inf")])
    s = evaluate(tr, "max_softmax", grid, strict, paper)
    assert torch.allclose(s.exit_fractions.sum(1), torch.ones(3, dtype=torch.float64))
    # threshold -1: everyone leaves at exit 0; inf: everyone reaches the final exit
    assert s.exit_fractions[0, 0] == 1 and s.rel_macs_strict[0] == 0.3 and s.rel_macs_paper[0] == 0.25
    final_acc = (tr.logits[-1].argmax(-1) == tr.labels).double().mean()
    assert s.accuracy[2] == final_acc and s.agreement[2] == 1 and s.rel_macs_strict[2] == 1.15
    # the middle setting by hand
    idx = _brute_first_exit(tr.scores("max_softmax"), [0.6, 0.6])
    pred = tr.predictions()[idx, torch.arange(len(tr))]
    assert s.accuracy[1] == (pred == tr.labels).double().mean()
    frac = torch.bincount(idx, minlength=3).double() / len(tr)
    assert torch.isclose(s.rel_macs_strict[1], frac @ torch.tensor(strict, dtype=torch.float64))


def test_grid_comes_from_calibration_quantiles_and_ends_with_never_exit():
    grid = quantile_grid(_trace().scores("max_softmax"), n=50)
    assert grid[-1] == float("inf") and torch.all(grid[:-1].diff() > 0) and len(grid) <= 50
    assert grid[0] > 0 and grid[-2] <= 1


def test_trace_round_trips_through_safetensors(tmp_path):
    tr = _trace()
    tr.confidence = torch.rand(3, 200)
    tr.save(tmp_path / "t.safetensors")
    back = Trace.load(tmp_path / "t.safetensors")
    assert torch.equal(back.logits, tr.logits) and torch.equal(back.labels, tr.labels)
    assert torch.equal(back.confidence, tr.confidence)
