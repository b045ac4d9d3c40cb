"""Reports: golden tables from fixed fixture results, every figure rendered, the report and compare
commands end to end, and proof that reports/ never imports torch.

Fixtures (tests/data/results) are thinned copies of a real quick run plus synthetic seeds, a joint
method with an infeasible seed, a risk_control section and an error cell
(tests/data/make_fixtures.py made them). Regenerate the golden files with ``UPDATE_GOLDEN=1 pytest
tests/test_reports.py`` and review the diff.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exitbench.cli import main
from exitbench.core.results import SCHEMA_VERSION, CellResult
from exitbench.reports import compare, figures, load, tables
from tests.conftest import cell_config

DATA = Path(__file__).parent / "data" / "results"
GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    return load.load_cells(DATA)


def _result(**d) -> CellResult:
    """A typed result from the fields a unit check needs."""
    return CellResult.from_dict({"schema_version": SCHEMA_VERSION, "cell": "c", **d})


def _point(kind="accuracy_drop", target=0.01, **test) -> dict:
    metrics = {"accuracy": None, "agreement": None, "rel_macs_strict": None, "rel_macs_paper": None, **test}
    return {"kind": kind, "target": target, "feasible": True, "score": "max_softmax",
            "headline": kind == "accuracy_drop", "test": metrics, "calibration": metrics}


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 to accept)"


# ------------------------------------------------------------------------------- the whole report, torch-free

@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """Build the full report in a fresh interpreter and prove that no torch module was imported."""
    out = tmp_path_factory.mktemp("report")
    code = textwrap.dedent(f"""
        import argparse, importlib, pkgutil, sys
        import exitbench.reports
        for m in pkgutil.iter_modules(exitbench.reports.__path__):
            importlib.import_module("exitbench.reports." + m.name)
        from exitbench.reports.report import cmd_report
        rc = cmd_report(argparse.Namespace(results={str(DATA)!r}, out={str(out)!r}, paper_view=True))
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not bad, f"reports imported torch: {{bad[:5]}}"
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_reports_never_import_torch(report_dir):
    _, stdout = report_dir  # the subprocess asserted it after importing every module and writing the report
    assert "exitbench: report of" in stdout


def test_report_writes_markdown_html_latex_and_every_figure(report_dir):
    out, _ = report_dir
    md = (out / "report.md").read_text()
    for section in ("Accuracy versus cost", "Accuracy at a MACs budget", "within 1 pt operating point",
                    "Trade-off hyper-parameters", "Where samples exit", "Latency", "Risk control",
                    "Risk control over every cell", "Differences between methods", "Failed cells"):
        assert section in md
    assert "RuntimeError: synthetic failure for the fixture" in md
    stems = ["accuracy_vs_macs", "accuracy_vs_cost_reduction", "sweeps", "exit_distribution", "latency",
             "latency_variants", "risk_control__digits__resnet18__pteenet-lam-1__ncal100"]
    for stem in stems:
        assert f"figures/{stem}.png" in md
        png, pdf = out / "figures" / f"{stem}.png", out / "figures" / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert pdf.read_bytes()[:5] == b"%PDF-"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(stems)
    assert "src=\"figures" not in page and "<link" not in page  # self-contained
    assert "<strong>" in page and "<table>" in page
    for name in ("budget", "budget_msdnet", "summary", "significance", "sweeps", "risk_summary",
                 "risk__digits__resnet18__pteenet-lam-1__ncal100"):
        tex = (out / "tables" / f"{name}.tex").read_text()
        assert r"\toprule" in tex and r"\bottomrule" in tex and (r"\textbf{" in tex or name == "sweeps")
    assert "ltt-per-exit" in (out / "tables" / "risk_control.csv").read_text()


# -------------------------------------------------------------------------------------------- golden tables

def test_budget_table_golden(results):
    t = tables.budget_table(results)
    _golden("budget.md", tables.to_markdown(t))
    _golden("budget.tex", tables.to_latex(t))
    _golden("budget_msdnet.md", tables.to_markdown(tables.budget_table(results, kind="msdnet_budget")))


def test_summary_table_golden(results):
    t = tables.summary_table(results)
    _golden("summary.md", tables.to_markdown(t))
    _golden("summary.tex", tables.to_latex(t))


def test_risk_table_golden(results):
    groups = figures.risk_groups(results)
    assert list(groups) == [("digits", "resnet18", "pteenet lam=1", 100)]
    t = tables.risk_table(next(iter(groups.values())), "risk", "Risk control")
    _golden("risk.md", tables.to_markdown(t))
    _golden("risk.tex", tables.to_latex(t))


def test_tables_mark_infeasible_partial_and_best(results):
    md = tables.to_markdown(tables.summary_table(results))
    sdn = next(line for line in md.splitlines() if "| sdn |" in line)
    assert "(1/2)" in sdn  # one of two seeds could not meet the accuracy target
    budget = tables.to_markdown(tables.budget_table(results))
    assert "| — | **" in budget or "| — |" in budget  # 25 % is out of reach for everyone here
    rn = [line for line in budget.splitlines() if "resnet18" in line or line.startswith("|  |  |")]
    # the best of each feasible budget column (50, 75, 100 %) is bold within the resnet18 panel
    assert sum(line.count("**") // 2 for line in rn) >= 3
    risk = tables.to_markdown(tables.risk_table(figures.risk_groups(results)[("digits", "resnet18", "pteenet lam=1",
                                                                             100)], "r", "r"))
    assert "ltt-per-exit †" in risk  # broke its guarantee in the fixture


# --------------------------------------------------------------------------------------------- unit checks

def test_budget_accuracy_reads_the_stored_budget_point_and_never_rechooses():
    # the choice itself (most accurate within the budget on calibration, ties: the cheaper) is
    # exitbench.methods.calibration.macs_budget's, tested in test_calibration.py
    infeasible = {"kind": "macs_budget", "target": 0.25, "feasible": False, "score": "max_softmax"}
    r = _result(status="ok", config=cell_config(),
                operating_points=[_point("macs_budget", 0.5, accuracy=0.79), infeasible,
                                  _point("macs_budget", 1.0, accuracy=0.96)])
    assert load.budget_accuracy(r, 0.5) == 0.79
    assert load.budget_accuracy(r, 0.25) is None  # infeasible
    assert load.budget_accuracy(r, 1.0) == 0.96 and load.budget_accuracy(r, 0.75) is None  # not recorded
    assert load.budgets([r]) == [0.25, 0.5, 1.0]


def test_seed_curves_are_averaged_on_a_common_grid():
    a = (load.np.array([0.4, 1.0]), load.np.array([0.5, 0.9]))
    b = (load.np.array([0.5, 1.2]), load.np.array([0.6, 1.0]))
    grid, mean, std = load.mean_curve([a, b], n=3)
    assert grid[0] == 0.5 and grid[-1] == 1.0  # only where every seed has data
    assert math.isclose(mean[0], (0.5 + 0.1 * 0.4 / 0.6 + 0.6) / 2)
    assert (std > 0).all()


def test_latex_escape():
    assert tables.latex_escape("a_b 50 % ±† {x}") == r"a\_b 50 \% \ensuremath{\pm}\ensuremath{^\dagger} \{x\}"


def test_figures_skip_what_is_absent():
    r = _result(status="ok", config=cell_config())
    assert figures.latency([r]) is None and figures.exit_distribution([r]) is None
    assert figures.accuracy_vs_macs([r]) is None and figures.risk_groups([r]) == {}


def test_write_summary_keeps_working(tmp_path):
    from exitbench.reports.summary import write_summary

    shutil.copytree(DATA, tmp_path / "res")
    csv_path, png = write_summary(tmp_path / "res")
    text = csv_path.read_text()
    assert "error" in text and "accuracy_drop" in text and "macs_budget" in text and png.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------- compare

def _variant(tmp_path) -> Path:
    """B: pteenet lam=1 two points better on every seed, torch upgraded, lam=2 now failing, a cell gone."""
    b = tmp_path / "B"
    shutil.copytree(DATA, b)
    for p in (b / "cells").glob("*.json"):
        r = json.loads(p.read_text())
        if r.get("env"):
            r["env"]["packages"]["torch"] = "9.9.9"
        if "pteenet-lam1__" in p.name and r["status"] == "ok":
            r["operating_points"][0]["test"]["accuracy"] += 0.02
        if "pteenet-lam2__" in p.name:
            r = {"schema_version": SCHEMA_VERSION, "status": "error", "cell": r["cell"], "config": r["config"],
                 "env": r["env"],
                 "error": "RuntimeError: out of memory"}
        p.write_text(json.dumps(r))
    next((b / "cells").glob("*sdn__seed1*")).unlink()
    return b


def test_compare_flags_failures_versions_and_significant_changes(tmp_path, capsys):
    b = _variant(tmp_path)
    torch_a = next(r.env["packages"]["torch"] for r in load.load_cells(DATA) if r.env)
    assert main(["compare", str(DATA), str(b), "--out", str(tmp_path / "cmp.md")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"NEW FAILURE: resnet18 on digits, pteenet lam=2 \[\w{6}\], seed 0: RuntimeError: out of memory",
                     out)
    assert f"version mismatch: torch version {torch_a} (A) vs 9.9.9 (B)" in out
    assert re.search(r"only in A \(no match in B\): resnet18 on digits, sdn \[\w{6}\], seed 1", out)
    row = next(line for line in out.splitlines() if "within 1 pt: test accuracy" in line and "lam=1" in line)
    assert "| ↑ |" in row and "+2.00" in row and "**BETTER**" in row
    assert (tmp_path / "cmp.md").read_text() == out


def test_compare_needs_seed_spread_and_reads_directions():
    def cells(accs, macs):
        return [_result(status="ok", config=cell_config(seed=i),
                        higher_is_better={"accuracy": True, "rel_macs_strict": False},
                        operating_points=[_point(accuracy=a, rel_macs_strict=m)])
                for i, (a, m) in enumerate(zip(accs, macs))]

    a = cells([0.90, 0.91, 0.92], [0.5, 0.5, 0.5])
    cs = {c.metric.id: c for c in compare.changes(a, cells([0.905, 0.915, 0.925], [0.6, 0.6, 0.6]))}
    assert cs["op.accuracy"].verdict == "better, within seed spread" and not cs["op.accuracy"].significant
    assert cs["op.rel_macs_strict"].verdict == "**WORSE**"  # lower is better; no spread on either side
    one = {c.metric.id: c for c in compare.changes(a[:1], cells([0.99], [0.5]))}
    assert one["op.accuracy"].verdict == "better, 1 seed (no spread)"


@pytest.mark.parametrize("cmd", [["report", "{missing}"], ["compare", "{data}", "{missing}"],
                                 ["report", "{empty}"]])
def test_bad_paths_give_one_line_and_exit_2(tmp_path, capsys, cmd):
    (tmp_path / "empty").mkdir()
    paths = {"missing": str(tmp_path / "nope"), "data": str(DATA), "empty": str(tmp_path / "empty")}
    assert main([c.format(**paths) for c in cmd]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: ") and "\n" not in err and "Traceback" not in err


def test_report_cli_on_failures_only(tmp_path, capsys):
    res = tmp_path / "res" / "cells"
    res.mkdir(parents=True)
    for p in DATA.glob("cells/*.json"):
        if json.loads(p.read_text())["status"] != "ok":
            shutil.copy(p, res)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "0 ok, 1 errors;" in md and "synthetic failure" in md
    assert "report.html" in capsys.readouterr().out


def _two_settings(loss: str, accs: list[float]) -> list[CellResult]:
    return [_result(status="ok", config=cell_config(method="pteenet", seed=i, hparams={"lam": 1.0, "loss": loss},
                                                    swept=["lam"]),
                    higher_is_better={"accuracy": True}, operating_points=[_point(accuracy=a)])
            for i, a in enumerate(accs)]


def test_settings_that_differ_in_anything_are_distinct_rows_and_never_paired():
    from exitbench.reports.labels import setting_labels

    v1, v2 = _two_settings("v1", [0.9, 0.91]), _two_settings("v2", [0.95, 0.96])
    assert v1[0].config.setting_id() != v2[0].config.setting_id()
    labels = setting_labels(v1 + v2)
    assert sorted(labels.values()) == ["pteenet lam=1 loss=v1", "pteenet lam=1 loss=v2"]
    # seeds pool only within a setting: two rows of two seeds, not one of four
    groups = compare.load.group(v1 + v2, compare._setting_key)
    assert sorted(len(g) for g in groups.values()) == [2, 2]
    # compare: A's v1 cells are not paired with B's v2 cells; each unmatched cell is listed
    assert compare.changes(v1, v2) == []
    fl = compare.flags(v1, v2)
    assert sum(f.startswith("only in A") for f in fl) == 2 and sum(f.startswith("only in B") for f in fl) == 2


def test_reports_use_the_latest_run_and_list_the_rest(tmp_path, capsys):
    from exitbench.core.store import write_manifest

    d = tmp_path / "R"
    shutil.copytree(DATA, d)
    stems = sorted(p.stem for p in (d / "cells").glob("*.json"))
    write_manifest(d, "m", stems[:-2], SCHEMA_VERSION)
    got = load.load_cells(d)
    assert len(got) == len(stems) - 2
    err = capsys.readouterr().err
    assert "2 cells in" in err and "not part of the latest run" in err and "--all" in err
    assert len(load.load_cells(d, all_cells=True)) == len(stems)
