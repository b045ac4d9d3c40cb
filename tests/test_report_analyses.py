"""The report's cross-cell analyses on hand-built results whose every number is known: the seed rule of
significance, the hyper-parameter sweep beside the published one, the risk-control summary over cells
and Pareto testing against ucb-wsr."""

from __future__ import annotations

import math

import pytest

from exitbench.core.results import SCHEMA_VERSION, CellResult
from exitbench.reports import figures, load, risk_summary, significance, sweeps
from tests.conftest import cell_config


def _metrics(acc: float, macs: float, agree: float | None = None, paper: float | None = None) -> dict:
    return {"accuracy": acc, "agreement": acc if agree is None else agree, "rel_macs_strict": macs,
            "rel_macs_paper": macs if paper is None else paper, "exit_fractions": [0.5, 0.5]}


def _point(kind: str, target: float | None, acc: float, macs: float, **kw) -> dict:
    m = _metrics(acc, macs, **kw)
    return {"kind": kind, "target": target, "feasible": True, "score": "max_softmax",
            "headline": kind == "accuracy_drop", "test": m, "calibration": m}


def _cell(method: str, seed: int, *, lam: float | None = None, points: list[dict], backbone: str = "bb",
          risk: list[dict] | None = None) -> CellResult:
    hp = {} if lam is None else {"lam": lam}
    config = cell_config(dataset="ds", backbone=backbone, method=method, hparams=hp, seed=seed,
                         swept=["lam"] if lam is not None else [])
    d = {"schema_version": SCHEMA_VERSION, "status": "ok", "cell": f"{method}{lam}{seed}", "config": config,
         "setting_id": f"{method}{lam}", "operating_points": points, "data": {"test": 10000},
         "backbone": {"name": backbone, "test_accuracy": 0.9, "calibration_accuracy": 0.9, "macs": 100,
                      "macs_counter": "x", "blocks": 4}}
    if risk is not None:
        d["risk_control"] = {"score": "max_softmax", "delta": 0.1, "n_cal": 100, "population": 1000, "trials": 100,
                             "sampling": "x", "allowance": 0.06, "seconds": 1.0, "rows": risk}
    return CellResult.from_dict(d)


def test_seed_rule_by_hand():
    assert load.seed_significant((1.0, 0.1, 3), (1.25, 0.1, 3)) is True  # 0.25 > 2 x 0.1
    assert load.seed_significant((1.0, 0.1, 3), (1.15, 0.1, 3)) is False
    assert load.seed_significant((1.0, 0.3, 3), (1.5, 0.1, 2)) is True  # pooled sqrt((0.09 + 0.01) / 2) = 0.224
    assert load.seed_significant((1.0, 0.3, 3), (1.4, 0.1, 2)) is False
    assert load.seed_significant((1.0, math.nan, 1), (2.0, 0.1, 3)) is None  # one seed: no spread to judge by


def test_significance_table_marks_the_best_and_judges_each_other_setting():
    cells = []
    for seed, (a, b, c) in enumerate([(0.80, 0.70, 0.795), (0.82, 0.71, 0.815), (0.81, 0.69, 0.80)]):
        for name, acc, macs in (("good", a, 0.4), ("bad", b, 0.6), ("close", c, 0.41 + 0.01 * seed)):
            cells.append(_cell(name, seed, points=[_point("macs_budget", 0.5, acc, 0.5),
                                                   _point("accuracy_drop", 0.01, 0.9, macs)]))
    t = significance.significance_table(cells)
    assert t.columns == ["dataset", "backbone", "method", "50 % MACs", "headline MACs"]
    rows = {r[2].text: [c.text for c in r[3:]] for r in t.rows}
    assert rows["good"] == ["best (81.0)", "best (0.400)"]
    assert rows["bad"][0] == "-11.0 sig." and rows["bad"][1] == "+0.200 sig."
    # close: 80.33 vs 81.0, both std 0.76 / 1.0 points: within twice the pooled std
    assert rows["close"][0] == "-0.7 n.s." and rows["close"][1] == "+0.020 sig."
    assert "10000 test images" in t.notes[1] and "±0.6 points" in t.notes[1]


def test_significance_with_one_seed_decides_nothing():
    cells = [_cell("a", 0, points=[_point("macs_budget", 0.5, 0.8, 0.5)]),
             _cell("b", 0, points=[_point("macs_budget", 0.5, 0.7, 0.5)])]
    rows = {r[2].text: r[3].text for r in significance.significance_table(cells).rows}
    assert rows == {"a": "best (80.0)", "b": "-10.0 1 seed"}


def _pteenet(seed: int, lam: float, cost: float, agree: float, acc: float) -> CellResult:
    return _cell("pteenet", seed, lam=lam, points=[_point("accuracy_drop", 0.01, 0.9, 0.9),
                                                   _point("method_default", None, acc, cost * 1.1, agree=agree,
                                                          paper=cost)])


def test_sweep_rows_are_the_method_default_point_and_the_published_sweep_stands_beside():
    cells = [_pteenet(s, lam, cost + 0.01 * s, 0.99 - 0.1 * lam, 0.85 - 0.05 * lam)
             for s in range(3) for lam, cost in ((0.5, 0.9), (1.0, 0.7), (2.3, 0.4))]
    cells.append(_cell("sdn", 0, points=[_point("accuracy_drop", 0.01, 0.9, 0.5)]))  # not swept: not shown
    df = sweeps.swept(cells)
    assert len(df) == 9 and set(df["method"]) == {"pteenet"}
    s = sweeps.summary(df).set_index("value")
    assert s.loc[1.0, "rel_macs_paper_mean"] == pytest.approx(0.71)  # 0.70, 0.71, 0.72
    assert s.loc[1.0, "rel_macs_paper_std"] == pytest.approx(0.01)
    assert s.loc[1.0, "rel_macs_strict_mean"] == pytest.approx(0.71 * 1.1)
    assert s.loc[2.3, "agreement_mean"] == pytest.approx(0.76)
    t = sweeps.sweep_table(cells)
    texts = [[c.text for c in r] for r in t.rows]
    assert texts[1][3:7] == ["1", "3", "0.710 ± 0.010", "0.781 ± 0.011"]
    published = [r for r in texts if r[0] == "published"]
    assert published and published[0][3] == "0.5" and published[0][5] == "0.922" and published[0][8] == "99.1"
    assert "spokV/PTEENET" in " ".join(t.notes)
    fig = sweeps.sweep_figure(cells)
    assert fig is not None and len([a for a in fig.axes if a.get_visible()]) == 2
    figures.plt.close(fig)


def test_sweeps_absent_without_a_numeric_sweep():
    assert sweeps.sweep_table([_cell("sdn", 0, points=[_point("accuracy_drop", 0.01, 0.9, 0.5)])]) is None


def _row(rule: str, eps: float, viol: float, macs: float, promise: str = "high-probability") -> dict:
    return {"rule": rule, "risk": "gap", "eps": eps, "guarantee": "x", "promise": promise, "test_risk_mean": eps / 2,
            "test_risk_std": 0.001, "violation_freq": viol, "mean_exit_index": 1.0, "rel_macs_strict_mean": macs}


def test_risk_summary_counts_broken_guarantees_over_cells():
    # allowance at delta 0.1, 100 trials: 2 sqrt(0.09 / 100) = 0.06 -> broken above 0.16
    a = _cell("m", 0, points=[_point("accuracy_drop", 0.01, 0.9, 0.5)],
              risk=[_row("ucb-wsr", 0.05, 0.05, 0.60), _row("pareto-testing", 0.05, 0.02, 0.50),
                    _row("naive", 0.05, 0.50, 0.40, "none")])
    b = _cell("m", 1, points=[_point("accuracy_drop", 0.01, 0.9, 0.5)],
              risk=[_row("ucb-wsr", 0.05, 0.20, 0.80), _row("pareto-testing", 0.05, 0.10, 0.88),
                    _row("naive", 0.05, 0.30, 0.40, "none")])
    t = risk_summary.risk_summary_table([a, b])
    rows = {r[1].text: [c.text for c in r[2:]] for r in t.rows}
    assert rows["ucb-wsr"] == ["0.05", "2", "1", "0.12", "0.20", "0.700 ± 0.141"]
    assert rows["pareto-testing"][2] == "0" and rows["naive"][2] == "—"
    v = risk_summary.versus([a, b])
    # pareto / ucb - 1: 0.5 / 0.6 - 1 = -16.7 %, 0.88 / 0.8 - 1 = +10 %
    assert v["cases"] == 2 and v["cheaper"] == 1 and v["costlier"] == 1
    assert v["median"] == pytest.approx((-1 / 6 + 0.1) / 2)
    assert "-16.7 %" in risk_summary.versus_text(v) and "+10.0 %" in risk_summary.versus_text(v)
