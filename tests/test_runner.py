"""End to end: a tiny matrix through the CLI (result files, resume, errors recorded per cell), and
every kind of bad input ending as one line with exit code 2."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from exitbench.cli import main
from exitbench.core.results import SCHEMA_VERSION, CellResult
from exitbench.core.store import tmp_path as tmp_path_of
from exitbench.methods.base import METHODS
from exitbench.methods.pteenet import PTEENet

TINY = {
    "datasets": [{"name": "synthetic", "n": 160, "num_classes": 3, "image_size": 16}],
    "backbones": ["test_resnet"],
    "methods": [{"name": "pteenet", "hparams": {"epochs": 2, "n_exits": 2, "placement": "linear"},
                 "grid": {"lam": [0.5, 1.0]}}],
    "seeds": [0],
    "backbone_training": {"epochs": 2},
    "evaluation": {"latency_batch_sizes": [1, 16], "latency_repeats": 2, "grid_size": 20, "threads": 1},
    "risk_control": {"rules": ["crc", "ucb-wsr", "ltt"], "risks": ["gap-prediction"], "eps": [0.1], "trials": 20},
}


def _write(tmp_path, matrix, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(matrix) if isinstance(matrix, dict) else matrix)
    return str(p)


THREADS_BEFORE = torch.get_num_threads()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    args = ["run", _write(tmp, TINY), "--out", str(out), "--cache", str(tmp / "cache"), "--quiet"]
    code = main(args)
    return code, out, args


def test_run_writes_results_summary_and_figure(quick_run):
    code, out, _ = quick_run
    assert code == 0
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 2
    r = json.loads(cells[0].read_text())
    assert r["schema_version"] == SCHEMA_VERSION and r["status"] == "ok"

    assert CellResult.from_dict(r).to_dict() == r  # the file is exactly one typed result
    assert r["backbone"]["macs_counter"] == "ptflops-aten+attention" and (out / r["weights"]).exists()
    assert {"backbone", "dataset", "method", "hparams", "seed"} <= set(r["config"])
    assert r["config"]["hparams"]["lam"] in (0.5, 1.0) and r["config"]["swept"] == ["lam"]
    assert {"packages", "git_commit", "device", "threads"} <= set(r["env"])
    assert 0 <= r["backbone"]["test_accuracy"] <= 1 and r["backbone"]["macs"] > 0
    assert len(r["exits"]) == 3 and r["exits"][-1]["rel_macs_paper"] == 1.0
    assert all(e["macs_cumulative"] > 0 and "test_accuracy" in e for e in r["exits"])
    assert len(r["sweep"]["test"]["accuracy"]) == len(r["sweep"]["thresholds"]) > 2
    op = r["operating_points"][0]
    assert op["kind"] == "accuracy_drop" and op["target"] == 0.01 and op["chosen_on"] == "calibration"
    assert op["headline"] and op["timed"] and len(op["thresholds"]) == 2
    kinds = [(p["kind"], p.get("target")) for p in r["operating_points"]]
    assert kinds == [("accuracy_drop", 0.01), ("patience", 0.01), *[("macs_budget", b) for b in (0.25, 0.5, 0.75, 1.0)],
                     *[("msdnet_budget", b) for b in (0.25, 0.5, 0.75, 1.0)], ("method_default", None),
                     ("latency_budget", 0.5), ("latency_budget", 0.7)]
    for p in r["operating_points"]:
        if p["kind"] in ("macs_budget", "msdnet_budget") and p["feasible"]:  # fits its budget on calibration
            assert p["calibration"]["rel_macs_strict"] <= p["target"] + 1e-9
        if p["feasible"]:  # every point carries its predicted latency, labelled a prediction
            assert {x["batch_size"] for x in p["predicted_latency"]} == {1, 16}
            assert all("prediction" in x["estimate"] and x["predicted_ratio"] > 0 for x in p["predicted_latency"])
    prof = r["latency_profile"]
    assert prof["sizes"] == [1, 4, 8, 16] and len(prof["stage_ms"]) == len(prof["head_ms"]) == 3
    for split in ("calibration", "test"):
        assert {"accuracy", "agreement", "rel_macs_strict", "rel_macs_paper", "exit_fractions"} <= set(op[split])
        assert math.isclose(sum(op[split]["exit_fractions"]), 1.0)
    # within 1 point on calibration, by construction
    assert op["calibration"]["accuracy"] >= r["backbone"]["calibration_accuracy"] - 0.01
    lat = {(x["variant"], x["batch_size"]): x for x in r["latency"]}
    variants = ("backbone", "compaction", "masking", "batch-uniform", "full+select", "per-stage-ideal")
    assert set(lat) == {(v, b) for v in variants for b in (1, 16)}
    for x in lat.values():
        assert x["median_ms"] > 0 and x["iqr_ms"] >= 0 and x["repeats"] == 2
    dyn = lat[("compaction", 16)]
    assert "realisation" in dyn and dyn["latency_ratio"] > 0 and dyn["realisation_note"]
    # per-sample variants agree with compaction exactly; the simulations are labelled as such
    for v in ("compaction", "masking", "full+select"):  # checked against the cell's own test trace
        assert lat[(v, 16)]["checked"] == 16 and lat[(v, 16)]["differ_predictions"] == 0, lat[(v, 16)]
    assert lat[("masking", 16)]["exit_fractions"] == dyn["exit_fractions"]
    assert {v for (v, _), x in lat.items() if x["simulation"]} == {"full+select", "per-stage-ideal"}
    assert all(isinstance(x["noisy"], bool) for x in lat.values())
    assert torch.get_num_threads() == THREADS_BEFORE, "the run's thread count leaked out"
    assert (out / "summary.csv").stat().st_size > 0 and (out / "accuracy_vs_macs.png").stat().st_size > 1000
    assert all((out / p).exists() for p in r["traces"].values())
    rc = r["risk_control"]
    assert rc["trials"] == 20 and rc["delta"] == 0.1 and rc["score"] == "confidence" and rc["n_cal"] > 0
    assert {row["rule"] for row in rc["rows"]} == {"crc", "ucb-wsr", "ltt", "oracle", "random"}
    assert all(0 <= row["violation_freq"] <= 1 and row["eps"] == 0.1 for row in rc["rows"])


def test_second_cell_reuses_the_cached_backbone(quick_run):
    _, out, _ = quick_run
    rs = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert sorted(r["backbone"]["training"]["cached"] for r in rs) == [False, True]
    assert len({r["backbone"]["test_accuracy"] for r in rs}) == 1  # the very same weights


def test_rerun_resumes_without_recomputing(quick_run, capsys):
    _, out, args = quick_run
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(args) == 0
    assert "2 reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before


@METHODS.register()
class _Broken(PTEENet):
    name = "broken_for_test"

    def fit(self, net, loaders, budget, trainer):
        raise RuntimeError("boom in fit")


def test_an_error_in_one_cell_is_recorded_and_the_others_run(tmp_path):
    m = {**TINY, "methods": [{"name": "broken_for_test", "hparams": {"epochs": 1, "n_exits": 2}},
                             {"name": "pteenet", "hparams": {"epochs": 1, "n_exits": 2}}],
         "evaluation": {**TINY["evaluation"], "latency": False}}
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, m), "--out", str(out), "--quiet"]) == 1
    rs = {r["config"]["method"]: r for r in (json.loads(p.read_text()) for p in (out / "cells").glob("*.json"))}
    assert rs["broken_for_test"]["status"] == "error" and "boom in fit" in rs["broken_for_test"]["error"]
    assert rs["pteenet"]["status"] == "ok"
    assert "error" in (out / "summary.csv").read_text()


BAD = [
    ({**TINY, "backbones": ["resnet181"]}, "backbones[0].name: unknown timm model 'resnet181'; did you mean"),
    ({**TINY, "datasets": ["cifar11"]}, "datasets[0].name: unknown dataset 'cifar11'; did you mean 'cifar10'"),
    ({**TINY, "methods": ["pteenett"]}, "methods[0].name: method: unknown method 'pteenett'; did you mean"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"lamda": 1}}]}, "did you mean 'lam'"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"n_exits": 12}}]},
     "methods[0].hparams (on test_resnet): placement"),
    ({**TINY, "datasets": ["cifar10"]}, "download"),
    ({**TINY, "evaluatoin": {}}, "evaluatoin: unknown key; did you mean 'evaluation'"),
    ({**TINY, "backbones": [{"name": "test_resnet", "wieghts": "train"}]}, "backbones[0].wieghts: unknown key"),
    ({**TINY, "backbones": [{"name": "test_resnet", "weights": "nope.pth"}]}, "backbones[0].weights: file 'nope.pth'"),
    ("datasets: [digits\nbackbones: [", "malformed YAML at line"),
    ({**TINY, "risk_control": {"rules": ["crcc"]}}, "risk_control.rules: unknown rule 'crcc'; did you mean 'crc'"),
    ({**TINY, "risk_control": {"eps": [1.5]}}, "risk_control.eps[0]: must be strictly between 0 and 1"),
    ({**TINY, "seeds": []}, "seeds: empty list, which gives no cells"),
    ({**TINY, "methods": [{"name": "pteenet", "grid": {"lam": []}}]}, "methods[0].grid.lam: empty list"),
    ({**TINY, "backbone_training": {"epochs": -1}}, "backbone_training.epochs: must be >= 1"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"epochs": 0}}]}, "epochs=0: must be >= 1"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"epochs": -3}}]}, "epochs=-3: must be >= 1"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"lr": "fast"}}]}, "lr='fast': expected a number"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"batch_size": 0}}]}, "batch_size=0: must be >= 1"),
    ({**TINY, "methods": [{"name": "pteenet", "hparams": {"placement": [0.9, 0.1], "n_exits": 2}}]}, "must increase"),
    ({**TINY, "evaluation": {"threads": 0}}, "evaluation.threads: must be >= 1"),
]


@pytest.mark.parametrize("matrix, message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, matrix, message):
    code = main(["run", _write(tmp_path, matrix), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("exitbench: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_missing_matrix_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_validate_and_list(tmp_path, capsys):
    assert main(["validate", _write(tmp_path, TINY)]) == 0
    assert "2 cells" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "pteenet" in out and "digits" in out and "test_vit" in out


def test_operating_point_selection_is_on_calibration():
    from exitbench.benchmarks.config import expand
    from exitbench.benchmarks.stages import evaluate_points
    from exitbench.methods import calibration
    from exitbench.methods.base import get_method
    from tests.conftest import synthetic_trace

    class Costs:
        strict, paper = [0.3, 0.5, 0.7, 1.1], [0.3, 0.5, 0.7, 1.0]

    cell = expand({**TINY, "methods": [{"name": "sdn"}]})[0]
    method = get_method("sdn")()
    cal = synthetic_trace(400, exits=4, seed=0)
    ref = (cal.predictions()[-1] == cal.labels).double().mean().item()
    pts = {s: evaluate_points(cell, method, {"calibration": cal, "test": synthetic_trace(400, exits=4, seed=s)},
                              Costs, ref)[1] for s in (1, 2)}
    a, b = pts[1][0], pts[2][0]
    assert a.kind == "accuracy_drop" and a.headline and a.feasible
    # test must not influence the choice: two test splits, the same thresholds; they are calibration's own
    assert a.thresholds == b.thresholds and a.test.accuracy != b.test.accuracy
    grid = calibration.quantile_grid(cal.scores("max_softmax"), cell.evaluation.grid_size)
    assert list(calibration.accuracy_drop(cal, "max_softmax", Costs.strict, 0.01, grid, ref).thresholds) == a.thresholds
    assert a.calibration.accuracy >= ref - 0.01
    unreachable = evaluate_points(cell, method, {"calibration": cal, "test": cal}, Costs, 1.5)[1][0]
    assert unreachable.feasible is False and unreachable.thresholds is None and unreachable.reason


def test_harness_trained_backbones_are_reproducible(tmp_path):
    """Same cell, fresh caches, a disturbed global RNG: the very same weights."""
    from exitbench.benchmarks.config import expand
    from exitbench.benchmarks.data import load_splits
    from exitbench.benchmarks.stages import prepare_backbone

    cell = expand({**TINY, "backbone_training": {"epochs": 1}})[0]
    splits = load_splits("synthetic", n=160, num_classes=3, image_size=16)
    a = prepare_backbone(cell, splits, tmp_path / "c1").backbone
    torch.rand(100)
    b = prepare_backbone(cell, splits, tmp_path / "c2").backbone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_per_exit_thresholds_are_screened_on_calibration_and_timed(tmp_path):
    """BranchyNet's operating point has one threshold per exit, chosen on calibration, and its
    latency is measured with exactly those thresholds."""
    m = {**TINY, "methods": [{"name": "branchynet", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}]}
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, m), "--out", str(out), "--quiet"]) == 0
    r = json.loads(next((out / "cells").glob("*.json")).read_text())
    op = r["operating_points"][0]
    assert op["kind"] == "accuracy_drop_per_exit" and op["chosen_on"] == "calibration" and op["headline"]
    assert isinstance(op["thresholds"], list) and len(op["thresholds"]) == 2
    assert op["calibration"]["accuracy"] >= r["backbone"]["calibration_accuracy"] - 0.01
    assert op["timed"] and {"backbone", "compaction"} <= {x["variant"] for x in r["latency"]}
    assert not any(p["timed"] for p in r["operating_points"][1:])
    assert CellResult.from_dict(r).config.trains_backbone is True


def test_risk_control_cli_options_are_checked(tmp_path, capsys):
    code = main(["run", _write(tmp_path, TINY), "--out", str(tmp_path / "o"), "--rc-rules", "crc,lttt"])
    assert code == 2 and "--rc-rules: unknown rule 'lttt'" in capsys.readouterr().err


def test_out_and_threads_are_checked_before_anything_runs(tmp_path, capsys):
    m = _write(tmp_path, TINY)
    (tmp_path / "file").write_text("x")
    for extra, message in ((["--out", str(tmp_path / "file")], "is a file, not a directory"),
                           (["--out", str(tmp_path / "o"), "--threads", "0"], "--threads: must be a positive"),
                           (["--out", str(tmp_path / "o"), "--threads", "-2"], "--threads: must be a positive")):
        assert main(["run", m, *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    # not writable: a path under a regular file cannot be created, whoever runs the test (root included)
    assert main(["run", m, "--out", str(tmp_path / "file" / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot write to" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_newer_schema_and_orphans_and_corrupt_results(quick_run, tmp_path, capsys):
    import shutil

    _, out, args = quick_run
    d = tmp_path / "copy"
    shutil.copytree(out, d)
    cells = sorted((d / "cells").glob("*.json"))
    r = json.loads(cells[0].read_text())
    cells[0].write_text(json.dumps({**r, "schema_version": 99}))
    run = [*args[:2], "--out", str(d), *args[4:]]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "schema_version 99 is newer than this exitbench" in err and err.count("\n") == 1
    assert main(["report", str(d)]) == 2 and "schema_version 99" in capsys.readouterr().err
    # a corrupt JSON is no result; a dead writer's temporary files are removed by the next run
    cells[0].write_text("{not json")
    mine = tmp_path_of(cells[1])  # this host, this PID: a dead writer is this host with a PID that is gone
    orphan = mine.with_name(mine.name.replace(f".{os.getpid()}.tmp", ".999999999.tmp"))
    orphan.write_text("half")
    elsewhere = mine.with_name(f".{cells[1].name}.other-host.1.tmp")  # another host's: its PID means nothing here
    elsewhere.write_text("being written")
    assert main(run) == 0
    text = capsys.readouterr().out
    assert "(1 already have results)" in text and "1 ok" in text and "1 reused" in text
    assert not orphan.exists() and elsewhere.exists()  # left alone until it is a day old


def test_evaluation_changes_reanalyse_without_training(quick_run, tmp_path, capsys, monkeypatch):
    """--rc-eps and latency settings re-analyse from stored traces and weights; --no-latency keeps the
    stored timing (it means: do not time now)."""
    import shutil

    from exitbench.benchmarks import training

    _, out, args = quick_run
    d = tmp_path / "copy"
    shutil.copytree(out, d)
    before = {p.name: json.loads(p.read_text()) for p in (d / "cells").glob("*.json")}

    def no_training(*a, **k):
        raise AssertionError("re-analysis must not train")

    monkeypatch.setattr(training, "method_trainer", no_training)
    monkeypatch.setattr(training, "train_backbone", no_training)
    monkeypatch.setattr(PTEENet, "fit", no_training)
    run = [*args[:2], "--out", str(d), *args[4:]]
    assert main([*run, "--rc-eps", "0.05"]) == 0
    text = capsys.readouterr().out
    assert text.count("re-analysed") == 3 and "2 re-analysed, 0 reused" in text and "(risk_control)" in text
    after = {p.name: json.loads(p.read_text()) for p in (d / "cells").glob("*.json")}
    assert set(after) == set(before)  # the same cells: the key covers only what determines training
    for name, r in after.items():
        assert {row["eps"] for row in r["risk_control"]["rows"]} == {0.05}
        assert r["latency"] == before[name]["latency"] and r["sweep"] == before[name]["sweep"]
        assert r["training"] == before[name]["training"] and r["reanalysed"]["stages"] == ["risk_control"]
    assert main([*run, "--rc-eps", "0.05", "--no-latency"]) == 0  # nothing measured is thrown away
    assert "0 re-analysed, 2 reused" in capsys.readouterr().out
    assert all(json.loads(p.read_text())["latency"] == before[p.name]["latency"] for p in (d / "cells").glob("*.json"))
    # latency settings: re-timed from the saved weights, same exits as when trained
    assert main([*run, "--rc-eps", "0.05", "--threads", "2"]) == 0
    assert "2 re-analysed" in capsys.readouterr().out
    for p in (d / "cells").glob("*.json"):
        lat = json.loads(p.read_text())["latency"]
        old = {(x["variant"], x["batch_size"]): x for x in before[p.name]["latency"]}
        for x in lat:
            if x["variant"] == "compaction":
                assert x["exit_fractions"] == old[("compaction", x["batch_size"])]["exit_fractions"]
    assert main([*run, "--rc-eps", "0.05", "--threads", "2"]) == 0
    assert "0 re-analysed, 2 reused" in capsys.readouterr().out


def test_check_runs_the_contract_on_an_installed_method(capsys):
    assert main(["check", "sdn", "--backbones", "test_resnet"]) == 0
    out = capsys.readouterr().out
    assert "exitbench check sdn: 4 passed, 0 failed" in out
    assert main(["check", "sdnn"]) == 2 and "did you mean 'sdn'" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "epochs = 10: training epochs" in capsys.readouterr().out  # each hyper-parameter's default and help


def test_two_entries_that_differ_in_one_hparam_are_two_settings(tmp_path, capsys):
    import csv

    m = {**TINY, "methods": [{"name": "pteenet", "hparams": {"epochs": 1, "n_exits": 2, "loss": loss}}
                             for loss in ("v1", "v2")],
         "evaluation": {**TINY["evaluation"], "latency": False}, "risk_control": False}
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, m), "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    ids = {r["setting"]: r["setting_id"] for r in rows}
    assert sorted(ids) == ["pteenet loss=v1", "pteenet loss=v2"] and len(set(ids.values())) == 2
    assert len({(r["setting"], r["setting_id"]) for r in rows}) == 2  # one id per label
    # the next run with one entry changed: the old cell stays on disk but is not part of the latest run
    m["methods"][1]["hparams"]["loss"] = "v1"
    m["methods"][1]["hparams"]["lam"] = 2.0
    assert main(["run", _write(tmp_path, m), "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "1 ok, 0 errors, 0 re-analysed, 1 reused" in captured.out
    assert "1 cells in" in captured.err and "not part of the latest run" in captured.err
    assert len(list((out / "cells").glob("*.json"))) == 3
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted({r["setting"] for r in rows}) == ["pteenet lam=1", "pteenet lam=2"]  # what tells them apart
