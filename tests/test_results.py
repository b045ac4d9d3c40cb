"""The result contract: typed round trips (inf thresholds included), schema checks, typed lookups."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

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
from exitbench.core.spec import Cell
from exitbench.reports.labels import point_label
from tests.conftest import cell_config


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
    return CellResult("ok", "c", Cell.from_dict(cell_config()), operating_points=points, latency=lat, risk_control=rc)


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
    assert point_label(r.operating_points[1]) == "≤ 50 % MACs" and point_label(r.operating_points[0]) == "within 1 pt"
    assert set(POINT_KINDS) >= {p.kind for p in r.operating_points}


@pytest.mark.parametrize("version, message", [(SCHEMA_VERSION + 1, "newer than this exitbench's"),
                                              (2, "too old to migrate; rerun `exitbench run`"),
                                              (None, "not an exitbench result")])
def test_other_schema_versions_are_refused_in_one_line(version, message):
    d = {**_result().to_dict(), "schema_version": version}
    with pytest.raises(UserError, match=message) as e:
        CellResult.from_dict(d, "cells/x.json")
    assert str(e.value).startswith("cells/x.json: ") and "\n" not in str(e.value)


def test_an_older_result_may_be_recomputed_but_a_newer_one_never_overwritten():
    check_schema({"schema_version": 2}, "x", older_ok=True)
    with pytest.raises(UserError, match="newer"):
        check_schema({"schema_version": SCHEMA_VERSION + 1}, "x", older_ok=True)


STORED = Path(__file__).parent / "data" / "results" / "cells"  # results written by schema 3, kept as stored
# those copied from a real run (tests/data/make_fixtures.py makes up the other seeds and the sdn cells, keys too)
REAL = {p.name for p in STORED.glob("*pteenet*__seed0__*.json")}


@pytest.mark.parametrize("path", sorted(STORED.glob("*.json")), ids=lambda p: p.stem)
def test_a_schema_3_result_is_migrated_on_read_with_its_key_and_setting_id(path):
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 3 and "init" in stored["config"]
    r = CellResult.from_dict(stored, path)
    assert r.schema_version == SCHEMA_VERSION and json.loads(path.read_text()) == stored  # the file is not touched
    if path.name in REAL:  # the slug's key and the setting id: the cell is found, and pooled as before
        assert path.stem.endswith(r.config.key()) and r.config.setting_id() == (r.setting_id or r.config.setting_id())
    if r.ok:
        want = "mixed" if stored["config"]["trains_backbone"] else "disjoint"
        assert r.config.regime == r.config.method_regime == want
    assert CellResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r  # and it round-trips as schema 4


@pytest.mark.parametrize("config, regime, method_regime", [
    ({"init": "scratch"}, "joint", ""),  # the joint regime was said by init alone
    ({"init": "backbone", "regime": "mixed", "trains_backbone": True}, "mixed", ""),  # an explicit regime: not own
    ({"init": "backbone", "trains_backbone": False}, "disjoint", "disjoint"),  # the method's own
    ({"init": "backbone"}, "", ""),  # an error cell that did not say: unknown
])
def test_the_schema_3_upgrade_resolves_the_regime_the_stored_config_implies(config, regime, method_regime):
    d = {"schema_version": 3, "status": "error", "cell": "c", "config": cell_config(method="sdn", **config)}
    cell = CellResult.from_dict(d).config
    assert (cell.regime, cell.method_regime) == (regime, method_regime)
    old_key_had_regime = "regime" in config
    assert (cell.key() == replace(cell, regime="", method_regime="").key()) != old_key_had_regime or \
        cell.regime == "joint"


def test_a_config_that_is_no_cell_is_refused_in_one_line():
    d = {**_result().to_dict(), "config": {"dataset": "d"}}
    with pytest.raises(UserError, match=r"^cells/x.json: its config is not a cell specification .*rerun"):
        CellResult.from_dict(d, "cells/x.json")
