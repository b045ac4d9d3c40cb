"""Latency variants: what each computes (not how fast): masking and full+select give compaction's exact
predictions and exits, batch-uniform leaves only when the whole batch qualifies, the per-stage ideal runs
each stage on exactly the samples that reach it, and every record is labelled."""

from __future__ import annotations

import pytest
import torch

from exitbench.benchmarks.latency import measure_latency
from exitbench.benchmarks.variants import (
    DEFAULT_VARIANTS,
    LATENCY_VARIANTS,
    batch_uniform_forward,
    full_select_forward,
    masked_forward,
)
from exitbench.methods.policies import PatiencePolicy, ThresholdPolicy
from tests.conftest import midpoint_thresholds
from tests.test_syncs import _net


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = _net(3)
    x = torch.randn(48, 3, 16, 16)
    with torch.no_grad():
        scores = torch.stack([lg.softmax(-1).amax(-1) for lg in net.forward_all(x).logits[:-1]])
    return net, x, ThresholdPolicy("max_softmax", midpoint_thresholds(scores))


@pytest.mark.parametrize("forward", [masked_forward, full_select_forward])
@pytest.mark.parametrize("kind", ["threshold", "patience"])
def test_per_sample_variants_equal_compaction(setup, forward, kind):
    net, x, policy = setup
    make = (lambda: policy) if kind == "threshold" else (lambda: PatiencePolicy.shared(1, 3))
    ref_logits, ref_exit = net.forward_dynamic(x, make())
    logits, exit_idx = forward(net, x, make())
    assert torch.equal(exit_idx, ref_exit) and torch.allclose(logits, ref_logits, atol=1e-6)
    assert len(set(ref_exit.tolist())) >= 2  # samples really leave at different exits


def test_batch_uniform_leaves_only_when_everyone_qualifies(setup):
    net, x, policy = setup
    _, exit_idx = batch_uniform_forward(net, x, policy)
    assert exit_idx.unique().numel() == 1  # the whole batch together
    never = ThresholdPolicy("max_softmax", (2.0, 2.0, 2.0))
    always = ThresholdPolicy("max_softmax", (0.0, 0.0, 0.0))
    assert batch_uniform_forward(net, x, never)[1].tolist() == [3] * len(x)
    assert batch_uniform_forward(net, x, always)[1].tolist() == [0] * len(x)
    _, per_sample = net.forward_dynamic(x, policy)
    assert int(exit_idx[0]) >= int(per_sample.max())  # it waits for the last sample to qualify


def test_every_default_variant_is_timed_and_labelled(setup):
    net, x, policy = setup
    costs = [0.3, 0.5, 0.8, 1.1]
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])  # the plain backbone the net was cut from
    recs = measure_latency(backbone, net, policy, x, costs, batch_sizes=(1, 16), repeats=2, warmup=1,
                           max_samples_batch1=4, threads=1)
    by = {(r["variant"], r["batch_size"]): r for r in recs}
    assert set(by) == {(v, b) for v in DEFAULT_VARIANTS for b in (1, 16)}
    for (v, _), r in by.items():
        spec = LATENCY_VARIANTS.get(v)
        assert r["simulation"] == spec.simulation and r["median_ms"] > 0
        assert ("latency_ratio" in r) == (v != "backbone")
        assert ("exit_fractions" in r) == spec.exits
    assert by[("masking", 16)]["same_as_compaction"] and by[("full+select", 16)]["same_as_compaction"]
    assert by[("masking", 16)]["exit_fractions"] == by[("compaction", 16)]["exit_fractions"]
    # the MACs ratio of compaction is its exit fractions times the strict costs
    frac = by[("compaction", 16)]["exit_fractions"]
    assert abs(by[("compaction", 16)]["macs_ratio_strict"] - sum(f * c for f, c in zip(frac, costs))) < 1e-12


def test_unknown_variants_are_refused_in_one_line(setup):
    from exitbench.errors import UserError

    net, x, policy = setup
    with pytest.raises(UserError, match="unknown latency variant 'compacton'; did you mean 'compaction'"):
        measure_latency(torch.nn.Identity(), net, policy, x, [1, 1, 1, 1], variants=("compacton",))
