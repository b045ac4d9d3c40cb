"""Static baselines: a matrix's ``baselines`` become cells that train a plain timm model with the backbones'
recipe, time it side by side with the backbones it is next to, and show up in the report beside the methods."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import yaml

from exitbench.benchmarks.config import expand
from exitbench.cli import main
from exitbench.core.errors import UserError
from exitbench.reports import compare, load, static, tables

MATRIX = {
    "datasets": [{"name": "synthetic", "n": 160, "num_classes": 3, "image_size": 16}],
    # test_efficientnet is both a backbone and test_resnet's baseline: its weights are trained once
    "backbones": ["test_resnet", "test_efficientnet"],
    "baselines": [{"name": "test_efficientnet", "next_to": ["test_resnet"]}],
    "methods": [{"name": "pteenet", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}],
    "seeds": [0],
    "backbone_training": {"epochs": 2},
    "evaluation": {"latency_batch_sizes": [1, 16], "latency_repeats": 2, "grid_size": 20, "threads": 1},
}


def _write(tmp_path, matrix, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(matrix))
    return str(p)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    out, cache = tmp / "out", tmp / "cache"
    args = ["run", _write(tmp, MATRIX), "--out", str(out), "--cache", str(cache), "--quiet"]
    assert main(args) == 0
    return tmp, out, cache, args


def _static_result(out):
    (path,) = [p for p in (out / "cells").glob("*__static__*.json")]
    return path, json.loads(path.read_text())


def test_expand_makes_one_static_cell_per_dataset_baseline_and_seed():
    cells = expand({**MATRIX, "seeds": [0, 1], "baselines": ["test_efficientnet", "test_vit"]})
    statics = [c for c in cells if c.static]
    assert len(statics) == 4 and len(cells) == 4 + 2 * 2
    # next_to defaults to every backbone, except a baseline is never next to itself
    by_name = {c.backbone: c.next_to for c in statics if c.seed == 0}
    assert by_name["test_vit"] == (("test_resnet", None), ("test_efficientnet", None))
    assert statics[0].hparams == {} and not statics[0].risk_control.enabled
    # next_to is not part of the identity: the trained weights do not depend on it
    a = [c for c in expand(MATRIX) if c.static][0]
    b = [c for c in expand({**MATRIX, "backbones": ["test_resnet", "test_efficientnet", "test_vit"],
                            "baselines": [{"name": "test_efficientnet", "next_to": ["test_resnet", "test_vit"]}]})
         if c.static][0]
    assert a.key() == b.key() and a.analysis_keys()["latency"] != b.analysis_keys()["latency"]


@pytest.mark.parametrize("baselines, message", [
    (["resnet_not_a_model"], "baselines[0].name: unknown timm model 'resnet_not_a_model'; did you mean"),
    ([{"name": "test_vit", "next_to": ["test_resnett"]}],
     "baselines[0].next_to: 'test_resnett' is not a backbone of this matrix; did you mean 'test_resnet'"),
    ([{"name": "test_resnet", "next_to": ["test_resnet"]}], "baselines[0].name: test_resnet is also a backbone"),
    ([{"name": "test_vit", "epochs": 3}], "baselines[0].epochs: unknown key"),
])
def test_bad_baselines_are_one_line_errors(tmp_path, capsys, baselines, message):
    path = _write(tmp_path, {**MATRIX, "baselines": baselines})
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["run", path, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--quiet"]) == 2
    assert not list((tmp_path / "o").glob("cells/*.json"))  # no cell started


def test_static_is_not_a_method():
    with pytest.raises(UserError, match=r"methods\[0\].name: 'static' is not a method; list plain models under"):
        expand({**MATRIX, "methods": ["static"]})


def test_static_cell_result_trains_once_and_times_against_its_backbone(run):
    _, out, cache, _ = run
    _, r = _static_result(out)
    assert r["status"] == "ok" and r["config"]["method"] == "static"
    assert r["config"]["next_to"] == [["test_resnet", None]]
    assert len(r["exits"]) == 1 and r["operating_points"] == [] and "sweep" not in r
    assert r["backbone"]["name"] == "test_efficientnet" and r["backbone"]["training"]["epochs_run"] == 2
    assert (out / r["weights"]).exists() and all((out / t).exists() for t in r["traces"].values())
    # the same model as a backbone and as a baseline: one cache entry each for test_resnet and test_efficientnet,
    # the second run of it reading what the first trained
    assert r["backbone"]["training"]["cached"] is True
    assert len(list(cache.glob("*.safetensors"))) == 2
    ee = [json.loads(p.read_text()) for p in (out / "cells").glob("*__test_resnet__*.json")][0]
    recs = r["latency"]
    assert {x["batch_size"] for x in recs} == {1, 16}
    for x in recs:
        assert x["variant"] == "static" and x["against"] == "test_resnet" and x["latency_ratio"] > 0
        assert x["macs_ratio_strict"] == pytest.approx(r["backbone"]["macs"] / ee["backbone"]["macs"])
        assert x["ratio_of"] == "median of per-repeat paired ratios" and x["repeats"] == 2


def test_rerun_reuses_and_a_timing_change_retimes_only_the_static_cell_timing(run):
    tmp, out, _, args = run
    path, before = _static_result(out)
    assert main(args) == 0
    assert json.loads(path.read_text())["finished"] == before["finished"]
    changed = {**MATRIX, "evaluation": {**MATRIX["evaluation"], "latency_batch_sizes": [4]}}
    assert main(["run", _write(tmp, changed, "m2.yaml"), *args[2:]]) == 0
    after = json.loads(path.read_text())
    assert after["reanalysed"]["stages"] == ["latency"] and after["finished"] == before["finished"]
    assert {x["batch_size"] for x in after["latency"]} == {4}
    assert after["backbone"] == before["backbone"]  # nothing trained
    assert main(args) == 0  # back to the matrix the other tests read


def test_report_puts_baselines_beside_the_methods(run, tmp_path):
    _, out, _, _ = run
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Static baselines against the operating points" in md
    budget = (tmp_path / "rep" / "tables" / "budget.md").read_text()
    assert "test_efficientnet (static)" in budget
    summary = (tmp_path / "rep" / "tables" / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if "test_efficientnet (static)" in line)
    results = load.load_cells(out)
    (s,) = load.baselines(results)
    assert f"{100 * s.backbone.test_accuracy:.1f}" in row
    assert (tmp_path / "rep" / "figures" / "accuracy_vs_macs.png").stat().st_size > 0
    # static baselines are not method settings: no panel of their own, not in the early-exit views
    assert all(not r.static for r in load.ok(results))
    assert ("synthetic", "test_efficientnet") in load.group(load.ok(results), load.panel_key)  # as a backbone
    points = load.static_points(load.baselines(results), "synthetic", "test_resnet",
                                load.panel_macs([r for r in load.ok(results) if r.config.backbone == "test_resnet"]))
    assert [p.model for p in points] == ["test_efficientnet"] and 0 < points[0].rel_macs < 1
    assert not load.static_points(load.baselines(results), "synthetic", "test_efficientnet", 1)


def _with_accuracy(results, model, acc):
    out = []
    for r in results:
        if r.static and r.config.backbone == model:
            r = dataclasses.replace(r, backbone=dataclasses.replace(r.backbone, test_accuracy=acc))
        out.append(r)
    return out


def test_matches_says_when_a_smaller_static_model_matches_an_operating_point(run):
    _, out, _, _ = run
    results = load.load_cells(out)
    ee = next(r for r in load.ok(results) if r.config.backbone == "test_resnet")
    op = load.operating_point(ee)
    assert op.feasible
    acc, macs = op.test.accuracy, op.test.rel_macs_strict
    (s,) = load.baselines(results)
    rel = s.backbone.macs / ee.backbone.macs
    found, none = static.matches(_with_accuracy(results, "test_efficientnet", acc))  # equal accuracy
    if rel <= macs:  # cheaper and as accurate: it beats the point
        assert len(found) == 1 and found[0].beats and "beats" in found[0].text and not none
    else:  # costlier than the point: never a match, whatever its accuracy
        assert not found and "matches no operating point" in none[0]
    found, none = static.matches(_with_accuracy(results, "test_efficientnet", acc - 0.01))
    assert not found and len(none) == 1  # one seed: no spread, so a point less accurate never matches


def test_budget_table_shows_a_baseline_only_under_budgets_its_macs_fit(run):
    _, out, _, _ = run
    results = load.load_cells(out)
    (s,) = load.baselines(results)
    ee = next(r for r in load.ok(results) if r.config.backbone == "test_resnet")
    rel = s.backbone.macs / ee.backbone.macs
    t = tables.budget_table(results, budgets=(rel - 0.01, rel + 0.01))
    (row,) = [row for row in t.rows if "(static)" in row[2].text]
    assert row[4].text == tables.DASH and row[5].text == f"{100 * s.backbone.test_accuracy:.1f}"


def test_time_retimes_a_static_cell(run, tmp_path):
    _, out, _, _ = run
    path, before = _static_result(out)
    assert main(["time", str(out), "--device", "cpu", "--batch-sizes", "2", "--repeats", "2"]) == 0
    after = json.loads(path.read_text())
    new = [x for x in after["latency"] if x["batch_size"] == 2]
    assert len(new) == 1 and new[0]["against"] == "test_resnet" and new[0]["variant"] == "static"
    assert len(after["latency"]) == len(before["latency"]) + 1


def test_plan_counts_static_cells(run, capsys):
    tmp, out, _, _ = run
    assert main(["plan", _write(tmp, MATRIX), "--out", str(out), "--rate", "1e9"]) == 0
    text = capsys.readouterr().out
    assert "3 cells" in text and "3 done" in text


def test_compare_compares_static_cells_too(run, tmp_path):
    _, out, _, _ = run
    b = tmp_path / "B"
    shutil.copytree(out, b)
    path, r = _static_result(b)
    r["backbone"]["test_accuracy"] += 0.02
    path.write_text(json.dumps(r))
    cs = compare.changes(load.load_cells(out), load.load_cells(b))
    static_rows = {c.metric.id: c for c in cs if c.key[1] == "test_efficientnet" and c.key[2] == r["setting_id"]}
    acc = static_rows["backbone.test_accuracy"]
    assert acc.b[0] - acc.a[0] == pytest.approx(0.02) and acc.verdict == "better, 1 seed (no spread)"
    # its latency against its backbone is paired too (unchanged here)
    assert any(m.startswith("latency.static.") and c.verdict == "unchanged" for m, c in static_rows.items())
    text = compare.render(out, b, load.load_cells(out), load.load_cells(b))
    assert any("test_efficientnet" in line and "static model test accuracy" in line for line in text.splitlines())
