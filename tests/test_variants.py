"""Latency variants: what each computes (not how fast): masking and full+select give compaction's exact
predictions and exits, batch-uniform leaves only when the whole batch qualifies, the per-stage ideal runs
each stage on exactly the samples that reach it, and every record is labelled."""

from __future__ import annotations

import pytest
import torch

from exitbench.benchmarks.latency import TimingProtocol, measure_latency, measure_static
from exitbench.benchmarks.variants import (
    LATENCY_VARIANTS,
    batch_uniform_forward,
    full_select_forward,
    masked_forward,
)
from exitbench.core.spec import DEFAULT_VARIANTS
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
    expected = net.forward_dynamic(x, policy)
    expected = (expected[0].argmax(-1), expected[1])
    protocol = TimingProtocol(batch_sizes=(1, 16), repeats=2, warmup=1, max_samples_batch1=4, threads=1)
    recs = measure_latency(backbone, net, policy, x, costs, protocol, expected=expected).records
    by = {(r.variant, r.batch_size): r for r in recs}
    assert set(by) == {(v, b) for v in DEFAULT_VARIANTS for b in (1, 16)}
    for (v, _), r in by.items():
        spec = LATENCY_VARIANTS.get(v)
        assert r.simulation == spec.simulation and r.median_ms > 0
        assert (r.latency_ratio is not None) == (v != "backbone")
        assert (r.exit_fractions is not None) == spec.exits
    for v in ("compaction", "masking", "full+select"):  # the per-sample variants decide as the policy does
        assert by[(v, 16)].checked == 16 and by[(v, 16)].differ_predictions == by[(v, 16)].differ_exits == 0
    assert by[("batch-uniform", 16)].differ_exits > 0  # whole batches leave together: counted, not hidden
    assert by[("backbone", 16)].checked is None
    assert by[("masking", 16)].exit_fractions == by[("compaction", 16)].exit_fractions
    # the MACs ratio of compaction is its exit fractions times the strict costs
    frac = by[("compaction", 16)].exit_fractions
    assert abs(by[("compaction", 16)].macs_ratio_strict - sum(f * c for f, c in zip(frac, costs))) < 1e-12


def test_unknown_variants_are_refused_in_one_line(setup):
    from exitbench.core.errors import UserError

    net, x, policy = setup
    with pytest.raises(UserError, match="unknown latency variant 'compacton'; did you mean 'compaction'"):
        measure_latency(torch.nn.Identity(), net, policy, x, [1, 1, 1, 1], TimingProtocol(variants=("compacton",)))


# ------------------------------------------------------------------------- fair comparisons (docs/measurement.md)


def test_every_timed_request_ends_with_its_predictions_read_on_the_host(setup, monkeypatch):
    """No variant may run ahead into the next request: before this fix the backbone, full+select and the
    per-stage ideal were timed without any read while compaction read at every exit."""
    from exitbench.benchmarks import latency

    net, x, policy = setup
    read: dict[str, int] = {}
    current = {"variant": None}
    real_side_by_side = latency._side_by_side

    def counting(out):
        logits = out[0] if isinstance(out, tuple) else out
        assert isinstance(logits, torch.Tensor) and logits.shape[-1] == 5, "a request returned no predictions"
        read[current["variant"]] = read.get(current["variant"], 0) + 1

    def side_by_side(runs, device, repeats, warmup, bound):
        wrapped = {name: [(lambda r=r, n=name: (current.update(variant=n), r())[1]) for r in rs]
                   for name, rs in runs.items()}
        return real_side_by_side(wrapped, device, repeats, warmup, bound)

    monkeypatch.setattr(latency, "host_read", counting)
    monkeypatch.setattr(latency, "_side_by_side", side_by_side)
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1],
                    TimingProtocol(batch_sizes=(1, 16), repeats=3, warmup=1, max_samples_batch1=4))
    per_variant = (1 + 3) * (4 + 1)  # passes x requests (4 at batch 1, 1 batch of 16)
    assert read == {v: per_variant for v in DEFAULT_VARIANTS}


def test_a_batch_size_larger_than_the_split_is_recorded_at_the_size_timed(setup):
    from exitbench.benchmarks.latency import effective_batch_sizes

    net, x, policy = setup
    assert effective_batch_sizes((1, 32, 64, 1024), 48) == [1, 32, 48]
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    protocol = TimingProtocol(batch_sizes=(1, 64, 1024), repeats=1, warmup=0, max_samples_batch1=2,
                              variants=("compaction",))
    recs = measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1], protocol).records
    sizes = {(r.variant, r.batch_size, r.requested_batch_size, r.samples) for r in recs}
    assert sizes == {("backbone", 1, None, 2), ("compaction", 1, None, 2), ("backbone", 48, 64, 48),
                     ("compaction", 48, 64, 48)}  # 1024 is the same 48: timed once


def test_differences_from_the_trace_are_counted_not_asserted(setup):
    net, x, policy = setup
    logits, exits = net.forward_dynamic(x, policy)
    wrong_exits = exits.clone()
    wrong_exits[:3] = (wrong_exits[:3] + 1) % net.num_exits  # three samples the "trace" says leave elsewhere
    wrong_preds = logits.argmax(-1).clone()
    wrong_preds[5] = (wrong_preds[5] + 1) % 5
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    protocol = TimingProtocol(batch_sizes=(16,), repeats=1, warmup=0, variants=("compaction",))
    recs = measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1], protocol,
                           expected=(wrong_preds, wrong_exits)).records
    rec = next(r for r in recs if r.variant == "compaction")
    assert (rec.checked, rec.differ_exits, rec.differ_predictions) == (16, 3, 1)
    assert rec.differ_share == 3 / 16


def test_a_fast_path_that_cannot_be_built_is_left_out_with_a_note(setup, monkeypatch):
    from exitbench.benchmarks import fast, variants

    net, x, policy = setup

    def no_memory(self, x):
        raise fast.FastPathUnavailable("out of memory capturing a CUDA graph: (simulated)")

    monkeypatch.setattr(variants.FastModule, "__call__", no_memory)
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    protocol = TimingProtocol(batch_sizes=(16,), repeats=1, warmup=0, variants=("compaction",), fast="compile")
    measured = measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1], protocol)
    recs, notes = measured.records, measured.notes
    assert {r.variant for r in recs} == {"backbone", "compaction"}  # the fast path and its backbone dropped
    assert notes == ["batch 16: compile fast path left out (out of memory capturing a CUDA graph: (simulated))"]


def test_the_static_and_the_dynamic_measurement_share_one_timing_core(setup, monkeypatch):
    """Both go through the same size loop and side-by-side timing: one protocol, the same records' shape, and
    the same handling of a batch size that does not fit in memory (left out with a note, a static one too)."""
    from exitbench.benchmarks import latency

    net, x, policy = setup
    timed: list[list[str]] = []
    real_side_by_side = latency._side_by_side

    def side_by_side(runs, device, repeats, warmup, bound):
        timed.append(sorted(runs))
        if len(next(iter(runs.values()))) == 1:  # the one batch of 16 (batch 1 times 4 requests)
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_side_by_side(runs, device, repeats, warmup, bound)

    monkeypatch.setattr(latency, "_side_by_side", side_by_side)
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    protocol = TimingProtocol(batch_sizes=(1, 16), repeats=2, warmup=1, max_samples_batch1=4, variants=("compaction",),
                              inputs="random N(0,1), same shape (seeded)")
    dynamic = measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1], protocol)
    static = measure_static(backbone, {"test_resnet": backbone}, x, 10, {"test_resnet": 20}, protocol)
    assert timed == [["backbone", "compaction"]] * 2 + [["reference", "static"]] * 2
    assert dynamic.notes == static.notes == ["batch 16: out of memory on cpu; not timed"]
    records = dynamic.records + static.records
    assert [r.variant for r in records] == ["backbone", "compaction", "static"]
    assert all((r.batch_size, r.samples, r.repeats, r.warmup, r.inputs) == (1, 4, 2, 1, protocol.inputs)
               for r in records)
    assert static.records[0].against == "test_resnet" and static.records[0].macs_ratio_strict == 0.5
