"""The result contract: typed round trips (inf thresholds included), schema checks, typed lookups."""

from __future__ import annotations

import json
import math

import pytest

from exitbench.core.errors import UserError
from exitbench.core.results import (
    POINT_KINDS,
    SCHEMA_VERSION,
    CellResult,
    LatencyRecord,
    Metrics,
    OperatingPoint,
    RiskControlResult,
    RiskRow,
    check_schema,
)


def _result() -> CellResult:
    m = Metrics(0.9, 0.95, 0.7, 0.6, [0.5, 0.5])
    points = [OperatingPoint("accuracy_drop", 0.01, True, "max_softmax", [math.inf], m, m, headline=True, timed=True),
              OperatingPoint("macs_budget", 0.5, True, "max_softmax", [0.8], m, m),
              OperatingPoint("macs_budget", 0.25, False, "max_softmax", reason="budget below the cheapest")]
    lat = [LatencyRecord("backbone", 1, "cpu", 1.0, 0.1, 1.2, 5, False),
           LatencyRecord("compaction", 1, "cpu", 0.8, 0.2, 1.0, 5, True, latency_ratio=0.8, exit_fractions=[0.5, 0.5]),
           LatencyRecord("masking", 1, "cpu", 0.9, 0.0, 1.0, 5, False, latency_ratio=0.9)]
    rc = RiskControlResult("max_softmax", 0.1, 100, 400, 10, "with replacement", 0.06, 0.1,
                           [RiskRow("crc", "gap-prediction", 0.05, "E[R] <= eps", "expectation", 0.04, 0.01, 0.1,
                                    0.5, 0.8, 0.3)])
    return CellResult("ok", "c", {"dataset": "d", "seed": 0}, operating_points=points, latency=lat, risk_control=rc)


def test_a_result_round_trips_through_json_with_inf_thresholds():
    r = _result()
    text = json.dumps(r.to_dict(), allow_nan=False)  # +inf travels as "inf"
    back = CellResult.from_dict(json.loads(text))
    assert back == r and back.operating_points[0].thresholds == [math.inf]
    assert "path" not in r.to_dict() and "label" not in r.to_dict()  # runtime fields are never written


def test_points_and_latency_are_found_by_typed_values_not_names():
    r = _result()
    assert r.headline() is r.operating_points[0] and r.point("macs_budget", 0.5).thresholds == [0.8]
    assert r.point("macs_budget", 0.25).feasible is False and r.point("macs_budget", 0.75) is None
    assert r.latency_record("compaction", 1).latency_ratio == 0.8 and r.latency_noisy(1)
    assert not r.latency_noisy(1, "masking") and not r.latency_noisy(1, "backbone")  # per pair with the backbone
    assert r.operating_points[1].label == "≤ 50 % MACs" and r.operating_points[0].label == "within 1 pt"
    assert set(POINT_KINDS) >= {p.kind for p in r.operating_points}


@pytest.mark.parametrize("version, message", [(SCHEMA_VERSION + 1, "newer than this exitbench's"),
                                              (SCHEMA_VERSION - 1, "rerun `exitbench run`"),
                                              (None, "not an exitbench result")])
def test_other_schema_versions_are_refused_in_one_line(version, message):
    d = {**_result().to_dict(), "schema_version": version}
    with pytest.raises(UserError, match=message) as e:
        CellResult.from_dict(d, "cells/x.json")
    assert str(e.value).startswith("cells/x.json: ") and "\n" not in str(e.value)


def test_an_older_result_may_be_recomputed_but_a_newer_one_never_overwritten():
    check_schema({"schema_version": SCHEMA_VERSION - 1}, "x", older_ok=True)
    with pytest.raises(UserError, match="newer"):
        check_schema({"schema_version": SCHEMA_VERSION + 1}, "x", older_ok=True)
