"""Latency accounting: the prediction from a per-stage profile against hand-computed values, the batch-1
per-exit costs, and interpolation between profiled sizes."""

from __future__ import annotations

import math

from exitbench.benchmarks import accounting

# two stages + final head: stage k costs 2 ms per sample (linear through 0), heads 1 ms per sample
PROF = {"sizes": [1, 2, 4], "stage_ms": [[2, 4, 8], [2, 4, 8]], "head_ms": [[1, 2, 4], [1, 2, 4]]}


def test_reach_and_batch1_prediction_by_hand():
    assert accounting.reach([0.5, 0.5]) == [1.0, 0.5]
    p = accounting.predict(PROF, [0.5, 0.5], 1)
    # everyone: stage 0 + head 0 = 3 ms; half go on: stage 1 + final head = 3 ms -> 4.5 of a 2+2+1 = 5 ms backbone
    assert math.isclose(p["predicted_ms"], 4.5) and math.isclose(p["predicted_ratio"], 0.9)
    assert "prediction" in p["estimate"]


def test_batch_prediction_interpolates_the_profile():
    p = accounting.predict(PROF, [0.25, 0.75], 4)
    # stage 0 + head 0 on 4 samples: 8 + 4; 3 samples reach stage 1: 6 + 3 (interpolated between 2 and 4)
    assert math.isclose(p["predicted_ms"], 8 + 4 + 6 + 3)
    assert math.isclose(p["predicted_ratio"], 21 / (8 + 8 + 4))
    assert math.isclose(accounting._interp([1, 2, 4], [2, 4, 8], 8), 16)  # extrapolated from the last two
    assert accounting._interp([1, 2, 4], [2, 4, 8], 0) == 0


def test_batch1_exit_costs_count_every_head_on_the_way():
    assert accounting.exit_costs_batch1(PROF) == [3 / 5, 6 / 5]  # like strict MACs: the final exit costs > 1
    assert accounting.profile_sizes([256]) == [1, 64, 128, 256]


def test_gates_are_added_where_samples_reach_them():
    gated = {**PROF, "gate_ms": [[0.5, 0.5, 0.5]]}  # one early exit; its gate costs 0.5 ms at any size
    # batch 1, half leave at exit 0: 4.5 ms as above + everyone's gate at exit 0
    assert math.isclose(accounting.predict(gated, [0.5, 0.5], 1)["predicted_ms"], 4.5 + 0.5)
    assert accounting.exit_costs_batch1(gated) == [3.5 / 5, 6.5 / 5]  # leaving at k runs gates up to k
    assert accounting.predict(PROF, [0.5, 0.5], 1)["predicted_ms"] == 4.5  # a stored profile without gates


def test_the_profile_times_the_gates_with_a_policy_that_never_accepts():
    import torch

    from exitbench.methods.policies import ThresholdPolicy
    from tests.test_syncs import _net

    torch.manual_seed(0)
    net, x = _net(3), torch.randn(8, 3, 16, 16)
    prof = accounting.profile(net, x, [8], repeats=2, gate=ThresholdPolicy("max_softmax", (math.inf,) * 3))
    assert prof["sizes"] == [1, 2, 4, 8] and len(prof["gate_ms"]) == 3
    assert all(len(g) == 4 and all(t > 0 for t in g) for g in prof["gate_ms"])
    assert "gate_ms" not in accounting.profile(net, x, [8], repeats=1)
