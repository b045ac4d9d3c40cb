"""Calibrators on hand-made traces: accuracy drop, MACs budget, MSDNet geometric budget, per-exit coordinate
descent."""

from __future__ import annotations

import itertools

import torch

from exitbench.benchmarks.traces import Trace
from exitbench.methods.calibration import (
    accuracy_drop,
    coordinate_descent,
    geometric_budget,
    geometric_thresholds,
    macs_budget,
    per_exit_accuracy_drop,
    quantile_grid,
    sweep_metrics,
)
from tests.conftest import synthetic_trace

STRICT = [0.3, 1.1]  # one early exit + the final one


def _two_exit_trace(conf: list[float], early_ok: list[bool], final_ok: list[bool]) -> Trace:
    """Exit 0 has max-softmax ``conf`` (2 classes) and is right where ``early_ok``; the final exit is
    right where ``final_ok`` (label 0 everywhere)."""
    c = torch.tensor(conf, dtype=torch.float64)
    d = torch.log(c / (1 - c)).float()
    early = torch.stack([d, torch.zeros_like(d)], -1)  # predicts class 0
    early = torch.where(torch.tensor(early_ok)[:, None], early, early.flip(-1))
    final = torch.tensor([[5.0, 0.0] if ok else [0.0, 5.0] for ok in final_ok])
    return Trace(torch.stack([early, final]), torch.zeros(len(conf), dtype=torch.long))


# 6 samples sorted by confidence; the two least confident early predictions are wrong; final: 5/6 right
HAND = _two_exit_trace([0.95, 0.9, 0.8, 0.7, 0.6, 0.55], [True, True, True, True, False, False],
                       [True, True, True, True, True, False])
GRID = torch.tensor([0.5, 0.65, 0.75, 0.85, float("inf")], dtype=torch.float64)


def test_accuracy_drop_picks_the_cheapest_threshold_within_the_drop():
    # backbone accuracy 5/6. Threshold 0.65 -> samples with conf >= .65 leave (4, all right), the rest
    # go to the final exit (1 of 2 right): 5/6. Threshold 0.5 -> everyone leaves: 4/6.
    ch = accuracy_drop(HAND, "max_softmax", STRICT, drop=0.0, thresholds=GRID)
    assert ch.feasible and ch.thresholds == (0.65,) and abs(ch.accuracy - 5 / 6) < 1e-9
    assert abs(ch.rel_macs_strict - (4 * 0.3 + 2 * 1.1) / 6) < 1e-9
    ch = accuracy_drop(HAND, "max_softmax", STRICT, drop=1 / 6 + 1e-9, thresholds=GRID)
    assert ch.thresholds == (0.5,) and abs(ch.rel_macs_strict - 0.3) < 1e-9
    assert not accuracy_drop(HAND, "max_softmax", STRICT, drop=-0.5, thresholds=GRID).feasible
    # an explicit reference accuracy (the harness passes the reference backbone's): 4/6 is reached by 0.5
    ch = accuracy_drop(HAND, "max_softmax", STRICT, drop=0.0, thresholds=GRID, reference=4 / 6)
    assert ch.thresholds == (0.5,)
    assert not accuracy_drop(HAND, "max_softmax", STRICT, drop=0.0, thresholds=GRID, reference=0.9).feasible


def test_macs_budget_picks_the_most_accurate_setting_that_fits():
    ch = macs_budget(HAND, "max_softmax", STRICT, budget=0.7, thresholds=GRID)
    # 0.65 costs 0.567 with accuracy 5/6; 0.75 costs 0.833 (too much); 0.5 costs 0.3 with 4/6
    assert ch.feasible and ch.thresholds == (0.65,)
    ch = macs_budget(HAND, "max_softmax", STRICT, budget=0.35, thresholds=GRID)
    assert ch.thresholds == (0.5,)
    # 0.65, 0.75 and 0.85 all reach 5/6 within budget 0.9: ties on accuracy go to the cheaper threshold
    assert macs_budget(HAND, "max_softmax", STRICT, budget=0.9, thresholds=GRID).thresholds == (0.65,)
    ch = macs_budget(HAND, "max_softmax", STRICT, budget=0.2)
    assert not ch.feasible and "below the cheapest" in ch.reason


def _msdnet_loop(scores: torch.Tensor, p: float) -> list[float]:
    """MSDNet's dynamic_evaluate.calc_threshold, transcribed as a plain loop."""
    k_early, n = scores.shape
    probs = torch.tensor([p ** (k + 1) for k in range(k_early + 1)], dtype=torch.float64)
    probs /= probs.sum()
    gone = torch.zeros(n, dtype=torch.bool)
    out = []
    for k in range(k_early):
        order = scores[k].argsort(descending=True)
        want, count, thr = int(n * probs[k] + 1e-9), 0, float("inf")
        for i in order.tolist():
            if not gone[i]:
                count += 1
                if count == want:
                    thr = scores[k, i].item()
                    break
        out.append(thr)
        gone |= scores[k] >= thr
    return out


def test_geometric_thresholds_follow_msdnet():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 400, generator=g)
    ps = [0.5, 1.0, 1.7]
    thr = geometric_thresholds(scores, ps)
    for i, p in enumerate(ps):
        assert thr[i].tolist() == _msdnet_loop(scores, p)
    # p = 1: equal shares of 100 samples per exit (4 exits, no ties)
    _, _, frac = sweep_metrics(scores, torch.zeros(4, 400), [1, 2, 3, 4], thr[1:2])
    assert torch.allclose(frac[0], torch.full((4,), 0.25, dtype=torch.float64))
    trace = Trace(torch.randn(4, 400, 3, generator=g), torch.zeros(400, dtype=torch.long))
    ps, choices = geometric_budget(trace, "max_softmax", [0.2, 0.4, 0.6, 1.1])
    assert len(choices) == len(ps) == 40 and all(c.feasible for c in choices)
    costs = torch.tensor([c.rel_macs_strict for c in choices])
    assert torch.all(costs.diff() >= -1e-9), "a larger p keeps more samples for later exits"
    _, best = geometric_budget(trace, "max_softmax", [0.2, 0.4, 0.6, 1.1], budget=0.5)
    assert len(best) == 1 and best[0].rel_macs_strict <= 0.5


def _correct_trace(n=600, exits=4, classes=5, seed=0) -> Trace:
    return synthetic_trace(n, exits, classes, seed)


def test_coordinate_descent_is_feasible_locally_optimal_and_beats_shared():
    tr = _correct_trace()
    costs = [0.25, 0.5, 0.75, 1.1]
    scores = tr.scores("max_softmax")
    err = (tr.predictions() != tr.labels).double()
    limit = err[-1].mean().item() + 0.02
    thr, feasible = coordinate_descent(scores, err, costs, limit, grid_size=20)
    assert bool(feasible) and thr.shape == (3,)
    loss, cost, _ = sweep_metrics(scores, err, costs, thr[None])
    assert loss.item() <= limit + 1e-12
    shared = accuracy_drop(tr, "max_softmax", costs, 0.02, thresholds=quantile_grid(scores, 20))
    assert cost.item() <= shared.rel_macs_strict + 1e-12
    # no single-exit move on its grid is a cheaper feasible point (brute force)
    for k in range(3):
        cand = thr[None].repeat(20, 1)
        cand[:, k] = quantile_grid(scores[k], 20)
        lo, co, _ = sweep_metrics(scores, err, costs, cand)
        assert not bool(((lo <= limit + 1e-12) & (co < cost - 1e-12)).any())
    # several limits and several data sets at once give the same answers as one by one
    limits = torch.tensor([limit, limit + 0.05], dtype=torch.float64)
    many, _ = coordinate_descent(scores, err, costs, limits, grid_size=20)
    assert torch.equal(many[0], thr)
    batched, _ = coordinate_descent(torch.stack([scores, scores]), torch.stack([err, err]), costs, limits,
                                    grid_size=20)
    assert torch.equal(batched[1], many)


def test_coordinate_descent_matches_the_cartesian_optimum_on_two_exits():
    tr = _correct_trace(n=300, exits=3, seed=3)
    costs = [0.3, 0.6, 1.05]
    scores = tr.scores("max_softmax")
    err = (tr.predictions() != tr.labels).double()
    limit = err[-1].mean().item() + 0.03
    thr, _ = coordinate_descent(scores, err, costs, limit, grid_size=12, sweeps=10)
    grids = [quantile_grid(scores[k], 12) for k in range(2)]
    cart = torch.tensor(list(itertools.product(*[g.tolist() for g in grids])))
    lo, co, _ = sweep_metrics(scores, err, costs, cart)
    best = co[lo <= limit + 1e-12].min()
    _, mine, _ = sweep_metrics(scores, err, costs, thr[None])
    assert mine.item() <= best.item() + 0.02, "coordinate descent within 2 points of MACs of the grid optimum"


def test_per_exit_search_scales_to_ten_exits():
    import time

    tr = _correct_trace(n=5000, exits=11, classes=10, seed=1)
    costs = [(k + 1) / 11 for k in range(10)] + [1.2]
    start = time.perf_counter()
    ch = per_exit_accuracy_drop(tr, "max_softmax", costs, drop=0.01)
    assert time.perf_counter() - start < 5.0
    assert ch.feasible and len(ch.thresholds) == 10
    shared = accuracy_drop(tr, "max_softmax", costs, 0.01, thresholds=quantile_grid(tr.scores("max_softmax"), 50))
    assert ch.rel_macs_strict <= shared.rel_macs_strict + 1e-12
    assert ch.accuracy >= (tr.predictions()[-1] == tr.labels).double().mean().item() - 0.01 - 1e-12
