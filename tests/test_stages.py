"""Each stage of a cell alone, on tiny data: typed inputs and outputs, and run_cell as exactly their
sequence (its result equals running the stages by hand)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from exitbench.benchmarks import runner
from exitbench.benchmarks import stages as st
from exitbench.benchmarks.config import expand
from exitbench.benchmarks.data import to_tensors
from exitbench.benchmarks.latency import TimingProtocol
from exitbench.core.results import CellResult, LatencyRecord, OperatingPoint, RiskControlResult, ThresholdSweep
from tests.test_runner import TINY


@pytest.fixture(scope="module")
def cell():
    m = {**TINY, "methods": [{"name": "sdn", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}],
         "backbone_training": {"epochs": 1}}
    return expand(m)[0]


@pytest.fixture(scope="module")
def staged(cell, tmp_path_factory):
    """The stages run one by one, each output kept."""
    out, cache = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    splits = st.prepare_data(cell)
    ref = st.prepare_backbone(cell, splits, cache)
    fitted = st.fit_method(cell, splits, ref.backbone)
    traces = st.record_traces(fitted.net, splits)
    st.save_artifacts(out, cell, traces, fitted.net)
    sweep, points = st.evaluate_points(cell, fitted.method, traces, fitted.costs, ref.calibration_accuracy)
    test_x, protocol = to_tensors(splits.test)[0], TimingProtocol.of(cell.evaluation)
    timing = st.time_latency(protocol, ref.backbone, fitted.net, points, test_x, fitted.costs.strict)
    profile, points, latency = st.account_latency(cell, protocol, fitted.method, fitted.net, timing.points, traces,
                                                  test_x, fitted.costs, timing.records)
    risk = st.control_risk(cell, fitted.method, traces, fitted.costs.strict)
    result = st.assemble(cell, splits, ref, fitted, traces, sweep, points, latency, risk, 1.0, profile)
    torch.set_num_threads(threads)  # not leaked into later test modules
    return dict(out=out, cache=cache, splits=splits, ref=ref, fitted=fitted, traces=traces, sweep=sweep,
                timing=timing, points=points, latency=latency, profile=profile, risk=risk, result=result)


def test_data_and_backbone(staged, cell):
    splits, ref = staged["splits"], staged["ref"]
    assert st.prepare_data(cell, memo={"x": 1}) is not splits  # memo keyed by dataset, seed and options
    memo: dict = {}
    assert st.prepare_data(cell, memo=memo) is st.prepare_data(cell, memo=memo)
    assert not ref.backbone.training and 0 <= ref.calibration_accuracy <= 1 and ref.stats["weights"] == "train"
    assert ref.stats["cached"] is False and st.prepare_backbone(cell, splits, staged["cache"]).stats["cached"]


def test_fit_and_traces(staged, cell):
    fitted, traces = staged["fitted"], staged["traces"]
    assert fitted.net.num_exits == 3 and len(fitted.exits) == 2 and not fitted.net.training
    assert len(fitted.costs.strict) == 3 and fitted.costs.paper[-1] == 1.0 and fitted.training
    for split, tr in traces.items():
        assert tr.logits.shape[:2] == (3, len(getattr(staged["splits"], split)))
    assert all(p.exists() for p in st.artifact_paths(staged["out"], cell).values())
    back = st.load_traces(staged["out"], cell)
    assert torch.equal(back["test"].logits, traces["test"].logits)


def test_a_frozen_backbones_features_are_computed_once_and_give_the_same_traces(staged, cell):
    fitted, ref, splits = staged["fitted"], staged["ref"], staged["splits"]
    shared = st.frozen_identity(cell, ref, fitted)
    assert shared is not None and shared[0] == ref.key  # SDN: disjoint, frozen
    calls = []
    hook = fitted.net.stages[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        memo: dict = {}
        first = st.record_traces(fitted.net, splits, shared, memo)
        n = len(calls)
        again = st.record_traces(fitted.net, splits, shared, memo)  # another net on the same frozen backbone
    finally:
        hook.remove()
    assert n > 0 and len(calls) == n  # the stages ran for the first only
    for split in st.SPLITS:
        for tr in (first[split], again[split]):
            assert torch.equal(tr.logits, staged["traces"][split].logits)  # exactly what forward_all gives
    st.record_traces(fitted.net, splits, ("another backbone",), memo)
    assert {k[1] for k in memo if k[0] == "features"} == {("another backbone",)}  # one backbone's kept at a time
    assert st.frozen_identity(replace(cell, regime="mixed"), ref, fitted) is None  # a trained backbone: its own


def test_the_profile_is_taken_in_the_dtype_timed(staged, cell):
    fitted = staged["fitted"]
    bf16 = TimingProtocol.of(replace(cell.evaluation, dtype="bfloat16"))
    test_x = to_tensors(staged["splits"].test)[0]
    before = {k: v.clone() for k, v in fitted.net.state_dict().items()}
    prof, _, _ = st.account_latency(cell, bf16, fitted.method, fitted.net, staged["points"], staged["traces"], test_x,
                                    fitted.costs, [])
    assert prof["dtype"] == "bfloat16" and staged["profile"]["dtype"] == "float32"
    after = fitted.net.state_dict()  # a bfloat16 copy was profiled: the trained weights are not rounded
    assert all(v.dtype == after[k].dtype and torch.equal(v, after[k]) for k, v in before.items())


TIMED = ("seconds", "seconds_per_epoch", "finished", "env", "latency", "timed", "cached", "cache",
         "latency_profile", "predicted_latency")


def _untimed(d):
    """A result dict without what timing, dates and the machine decide (latency-budget points are chosen
    with the measured profile)."""
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items() if k not in TIMED}
    if isinstance(d, list):
        return [_untimed(v) for v in d if not (isinstance(v, dict) and v.get("kind") == "latency_budget")]
    return d


def test_points_latency_risk_and_the_result(staged, cell):
    sweep, points, latency, risk, result = (staged[k] for k in ("sweep", "points", "latency", "risk", "result"))
    assert isinstance(sweep, ThresholdSweep) and sweep.thresholds[-1] == float("inf")
    assert all(isinstance(p, OperatingPoint) for p in points) and sum(p.headline for p in points) == 1
    assert [p for p in points if p.timed] == [p for p in points if p.headline and p.feasible]
    prof = staged["profile"]
    assert prof["sizes"] == [1, 4, 8, 16] and all(len(s) == len(prof["sizes"]) for s in prof["stage_ms"])
    assert [p.kind for p in points].count("latency_budget") == 2
    assert all(p.predicted_latency for p in points if p.feasible)
    comp = [x for x in staged["latency"] if x.variant == "compaction"]
    assert comp and all(x.predicted_ratio is not None and x.predicted_ratio > 0 for x in comp)
    assert all(isinstance(x, LatencyRecord) for x in latency)
    assert isinstance(risk, RiskControlResult) and {r.rule for r in risk.rows} >= {"crc", "ucb-wsr", "ltt"}
    assert isinstance(result, CellResult) and result.ok and result.setting_id
    assert CellResult.from_dict(result.to_dict()).to_dict() == result.to_dict()  # the file form round-trips


def test_the_protocol_is_the_evaluations_timing_settings(cell):
    ev = replace(cell.evaluation, latency_batch_sizes=(2, 8), latency_repeats=7, threads=3, dtype="bfloat16",
                 latency_variants=("compaction",), fast="compile")
    protocol = TimingProtocol.of(ev)
    assert (protocol.enabled, protocol.batch_sizes, protocol.repeats, protocol.threads, protocol.dtype) == (
        True, (2, 8), 7, 3, "bfloat16")
    assert protocol.timed_variants == ev.timed_variants == ("compaction", "fast-compile")
    assert not TimingProtocol.of(replace(ev, latency=False)).enabled
    assert protocol.sizes(torch.device("cpu"), 5) == [(2, 2), (8, 5)]  # 8 asked, the 5 images timed


def test_the_latency_stages_return_new_values_and_leave_their_inputs_alone(staged, cell):
    fitted, traces, timing = staged["fitted"], staged["traces"], staged["timing"]
    _, points = st.evaluate_points(cell, fitted.method, traces, fitted.costs, staged["ref"].calibration_accuracy)
    points[0] = replace(points[0], timed=True)  # as a stored result's headline would be
    stored = copy.deepcopy(points)
    test_x = to_tensors(staged["splits"].test)[0]
    off = st.time_latency(replace(TimingProtocol.of(cell.evaluation), enabled=False), staged["ref"].backbone,
                          fitted.net, points, test_x, fitted.costs.strict)
    assert points == stored and off.records == [] and not any(p.timed for p in off.points)  # the caller's unchanged
    assert [p.timed for p in timing.points] == [p.headline for p in timing.points]
    records = copy.deepcopy(timing.records)
    _, accounted, latency = st.account_latency(cell, TimingProtocol.of(cell.evaluation), fitted.method, fitted.net,
                                               timing.points, traces, test_x, fitted.costs, timing.records)
    assert timing.records == records and all(p.predicted_latency is None for p in timing.points)
    assert all(p.predicted_latency for p in accounted if p.feasible)
    assert any(r.predicted_ratio for r in latency) and not any(r.predicted_ratio for r in timing.records)


def test_the_weights_rebuild_the_same_net(staged, cell):
    backbone, net = st.rebuild(cell, staged["splits"], staged["fitted"].method,
                               st.artifact_paths(staged["out"], cell)["weights"])
    x = to_tensors(staged["splits"].test)[0][:8]
    with torch.no_grad():
        a, b = net.forward_all(x).logits, staged["fitted"].net.forward_all(x).logits
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_run_cell_is_the_sequence_of_the_stages(staged, cell, tmp_path):
    r = runner.run_cell(cell, tmp_path, staged["cache"])  # cached backbone: the same reference
    assert _untimed(r.to_dict()) == _untimed(staged["result"].to_dict())


@pytest.mark.parametrize("method, regime, backbone_trains", [("sdn", "mixed", True), ("branchynet", "disjoint", False),
                                                             ("sdn", "joint", True)])
def test_the_regime_decides_what_trains(method, regime, backbone_trains, tmp_path):
    cell = expand({**TINY, "methods": [{"name": method, "regime": regime,
                                        "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}],
                   "backbone_training": {"epochs": 1}})[0]
    splits = st.prepare_data(cell)
    ref = st.prepare_backbone(cell, splits, tmp_path)
    before = {k: v.clone() for k, v in ref.backbone.state_dict().items()}
    fitted = st.fit_method(cell, splits, ref.backbone)
    assert fitted.training["budget"]["regime"] == regime
    assert all(torch.equal(before[k], v) for k, v in ref.backbone.state_dict().items()), "the reference changed"
    net_backbone = {**{f"stages.{k}": v for k, v in fitted.net.stages.state_dict().items()}}
    start = ({f"stages.{k}": v for k, v in type(fitted.net)(ref.backbone, fitted.exits, list(fitted.net.heads[:-1]))
              .stages.state_dict().items()})
    changed = any(not torch.equal(start[k], v) for k, v in net_backbone.items() if v.is_floating_point())
    assert changed == backbone_trains
