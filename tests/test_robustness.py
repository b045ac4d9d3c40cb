"""Nothing lost, nothing silent: a diverging cell, a result that cannot be written, damaged artifacts, a
partial report, and every bad input refused in one line before anything trains (a table over the matrix's
sections and the CLI's options). Signals and dead runners are in test_claims."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil

import pytest
import torch
import yaml

from exitbench.benchmarks import stages as st
from exitbench.benchmarks.training import TrainingDiverged, fit
from exitbench.cli import main
from exitbench.core.results import CellResult
from exitbench.core.spec import BackboneTraining, Cell
from tests.conftest import cell_config

ONE = {  # one tiny cell and its backbone, trained in seconds; no timing, no risk control
    "datasets": [{"name": "synthetic", "n": 160, "num_classes": 3, "image_size": 16}],
    "backbones": ["test_resnet"],
    "methods": [{"name": "sdn", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}],
    "seeds": [0],
    "backbone_training": {"epochs": 1},
    "evaluation": {"latency": False, "grid_size": 20, "threads": 1},
}


def _write(tmp_path, matrix, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(matrix))
    return str(p)


def _run(tmp_path, matrix, out="out", *extra):
    return main(["run", _write(tmp_path, matrix), "--out", str(tmp_path / out), "--cache", str(tmp_path / "cache"),
                 "--quiet", *extra])


def _cells(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


# ------------------------------------------------------------------------------------- a diverging cell

def test_a_diverging_cell_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    matrix = copy.deepcopy(ONE)
    matrix["methods"] = [{"name": "sdn", "hparams": {"epochs": 2, "n_exits": 2, "placement": "linear", "lr": 1e30}},
                         {"name": "pteenet", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}}]
    assert _run(tmp_path, matrix) == 1  # an error among the cells: exit 1, after every cell ran
    cells = _cells(tmp_path / "out")
    status = {json.loads(json.dumps(r["config"]))["method"]: r for r in cells.values()}
    assert status["pteenet"]["status"] == "ok"  # the cell after the diverging one still ran
    assert status["sdn"]["status"] == "error" and "training diverged at epoch" in status["sdn"]["error"]
    assert (tmp_path / "out" / "summary.csv").exists()
    out = capsys.readouterr().out
    assert "1 ok, 1 errors" in out and "lower the learning rate" in out


def test_the_loop_stops_at_the_first_non_finite_epoch():
    model = torch.nn.Linear(4, 2)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    calls = []

    def loss(out, y, m):
        calls.append(1)
        return out.sum() * float("nan")

    with pytest.raises(TrainingDiverged, match="training diverged at epoch 1 of 5"):
        fit(model, loss, list(model.parameters()), {"train": data}, BackboneTraining(epochs=5))
    assert len(calls) == 1


def test_non_finite_numbers_are_stored_as_text_and_read_back():
    r = CellResult(status="ok", cell="c", config=Cell.from_dict(cell_config()),
                   training={"loss_per_epoch": [1.0, math.nan, math.inf, -math.inf]})
    text = json.dumps(r.to_dict(), allow_nan=False)  # valid JSON, whatever the numbers
    assert json.loads(text)["training"]["loss_per_epoch"] == [1.0, "nan", "inf", "-inf"]


def test_a_result_that_cannot_be_written_is_that_cells_error(tmp_path, monkeypatch, capsys):
    real = st.write_result

    def refuse_ok(path, result):
        if result.ok:
            raise ValueError("Out of range float values are not JSON compliant")
        real(path, result)

    monkeypatch.setattr(st, "write_result", refuse_ok)
    assert _run(tmp_path, ONE) == 1
    (r,) = _cells(tmp_path / "out").values()
    assert r["status"] == "error" and "not JSON compliant" in r["error"]
    assert (tmp_path / "out" / "summary.csv").exists()


def test_a_full_disk_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    def full(path, result):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(st, "write_result", full)
    assert _run(tmp_path, ONE) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: cannot write") and "no space left" in err and "\n" not in err


# --------------------------------------------------------------------------------- damaged artifacts

@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("done")
    assert main(["run", _write(tmp, ONE), "--out", str(tmp / "out"), "--cache", str(tmp / "cache"), "--quiet"]) == 0
    return tmp


def _copy(done, tmp_path):
    shutil.copytree(done / "out", tmp_path / "out")
    shutil.copytree(done / "cache", tmp_path / "cache")


def _truncate(path, cut=100):
    os.truncate(path, path.stat().st_size - cut)  # a copy or a write cut short


def test_truncated_traces_are_recomputed_not_reused(done, tmp_path, capsys):
    _copy(done, tmp_path)
    _truncate(next((tmp_path / "out" / "traces").glob("*.test.safetensors")))
    assert _run(tmp_path, ONE) == 0
    out = capsys.readouterr().out
    assert "recomputing" in out and "test truncated" in out and "0 reused" in out
    (r,) = _cells(tmp_path / "out").values()
    assert r["status"] == "ok"


def test_a_truncated_cached_backbone_is_rebuilt(done, tmp_path, capsys):
    _copy(done, tmp_path)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    _truncate(entry)
    assert _run(tmp_path, ONE, "fresh") == 0
    assert f"rebuilding the cached backbone {entry.name}: weights truncated" in capsys.readouterr().out
    assert st.safetensors_problem(entry) is None


def test_a_failed_reanalysis_keeps_the_good_result(done, tmp_path, monkeypatch, capsys):
    _copy(done, tmp_path)
    (before,) = _cells(tmp_path / "out").values()

    def broken(out_dir, cell):
        raise RuntimeError("simulated unreadable traces")

    monkeypatch.setattr(st, "load_traces", broken)
    assert _run(tmp_path, {**ONE, "evaluation": {**ONE["evaluation"], "grid_size": 30}}) == 1
    (after,) = _cells(tmp_path / "out").values()
    assert after["status"] == "ok" and after["sweep"] == before["sweep"]  # the good result is kept ...
    assert "simulated unreadable traces" in after["reanalysis_error"]["error"]  # ... and the failure beside it
    assert "its previous result is kept" in capsys.readouterr().out


def test_a_report_during_a_run_says_it_is_partial(done, tmp_path, capsys):
    _copy(done, tmp_path)
    manifest = tmp_path / "out" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "cells": [*m["cells"], "synthetic__test_resnet__ztw__seed0__0000000000"]}))
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "1 cells of the latest run have no result yet" in capsys.readouterr().out
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "Partial: this report covers 1 of the 2 cells" in text and "ztw__seed0__0000000000" in text


def test_garbage_manifest_is_one_line(done, tmp_path, capsys):
    _copy(done, tmp_path)
    (tmp_path / "out" / "manifest.json").write_bytes(os.urandom(200))
    for cmd in (["report", str(tmp_path / "out")], ["compare", str(tmp_path / "out"), str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert "manifest.json: not an exitbench manifest" in err and "\n" not in err


# ------------------------------------------------------------------------ bad input, before any training

def _set(matrix, path, value):
    d = matrix
    *head, last = path.split(".")
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[int(last) if isinstance(d, list) else last] = value


BAD_MATRICES = [  # (field path, value, what the one line must say)
    ("methods.0.hparams.placement", 3, "methods[0].hparams: method sdn: placement=3: expected a name or a list"),
    ("methods.0.hparams.n_exits", 3.5, "n_exits=3.5: expected an integer"),
    ("methods.0.hparams.lr", math.inf, "lr=inf: expected a finite number"),
    ("methods.0.hparams.lr", "1e-3", "YAML reads 1e-3 as text"),
    ("methods.0.hparams.n_exits", 3, "placement lists 2 exits but n_exits is 3"),
    ("backbone_training.lr", math.inf, "backbone_training.lr: expected a finite number"),
    ("backbone_training.optimizer", "sgdd", "backbone_training.optimizer: unknown optimizer 'sgdd'; did you mean"),
    ("backbone_training.weight_decay", -1, "backbone_training.weight_decay: must be >= 0"),
    ("backbone_training.max_seconds", "ten", "backbone_training.max_seconds: expected a number"),
    ("backbone_training.epochs", 1.5, "backbone_training.epochs: expected a whole number"),
    ("backbone_training.batch_size", "64", "backbone_training.batch_size: expected a number, got '64'; YAML"),
    ("evaluation.latency_batch_sizes", [1.5], "evaluation.latency_batch_sizes[0]: expected a whole number"),
    ("evaluation.latency_batch_sizes", 0, "evaluation.latency_batch_sizes[0]: must be >= 1"),
    ("evaluation.grid_size", 20.5, "evaluation.grid_size: expected a whole number"),
    ("evaluation.accuracy_drop", -0.1, "evaluation.accuracy_drop: must be in [0, 1)"),
    ("evaluation.latency_repeats", 0, "evaluation.latency_repeats: must be >= 1"),
    ("evaluation.budgets", [math.nan], "evaluation.budgets[0]: expected a finite number"),
    ("risk_control", {"n_cal": 100000}, "risk_control.n_cal: 100000 is more than the 60 held-out samples"),
    ("risk_control", {"eps": [1.5]}, "risk_control.eps[0]: must be strictly between 0 and 1"),
    ("risk_control", {"trials": 2.5}, "risk_control.trials: expected a whole number"),
    ("datasets.0.calibration_fraction", "0.1", "datasets[0].calibration_fraction: must be a number"),
    ("datasets.0.nn", 5, "datasets[0].nn: unknown option for synthetic; did you mean 'n'?"),
    ("datasets", [], "datasets: empty list, which gives no cells"),
    ("backbones", [], "backbones: empty list, which gives no cells"),
    ("methods", [], "methods: empty list, which gives no cells"),
    ("seeds", [0, 0], "seeds[1]: the same entry as seeds[0]"),
    ("seeds", [-1], "seeds[0]: expected a whole number from 0 to 4294967295"),
    ("seeds", [2**40], "seeds[0]: expected a whole number from 0 to 4294967295"),
    ("backbones", ["test_resnet", "test_resnet"], "backbones[1]: the same entry as backbones[0]"),
    ("methods.1", {"name": "sdn", "hparams": {"epochs": 1, "n_exits": 2, "placement": "linear"}},
     "methods[1]: the same setting as methods[0]"),
    ("backbones.0", {"name": "test_resnet", "weights": "GARBAGE"}, "backbones[0].weights: cannot read"),
]


@pytest.mark.parametrize("path,value,message", BAD_MATRICES, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD_MATRICES])
def test_every_bad_matrix_value_is_one_line_before_training(path, value, message, tmp_path, capsys):
    matrix = copy.deepcopy(ONE)
    if isinstance(value, dict) and value.get("weights") == "GARBAGE":
        garbage = tmp_path / "w.safetensors"
        garbage.write_bytes(os.urandom(300))
        value = {**value, "weights": str(garbage)}
    if path == "methods.0.hparams.n_exits" and value == 3:
        matrix["methods"][0]["hparams"]["placement"] = [0.3, 0.6]
    if path == "methods.1":
        matrix["methods"].append(None)
    _set(matrix, path, value)
    for cmd in ("validate", "run"):
        args = [cmd, _write(tmp_path, matrix)] + (["--out", str(tmp_path / "out"), "--cache",
                                                   str(tmp_path / "cache"), "--quiet"] if cmd == "run" else [])
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("exitbench: error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("cache/*.safetensors"))  # nothing trained
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing of a results directory overwritten


BAD_OPTIONS = [  # (command line after the matrix / results directory, what the one line must say)
    (["run", "--rc-eps", "abc"], "--rc-eps: expected comma-separated numbers, got 'abc'"),
    (["run", "--rc-eps", "5"], "--rc-eps: must be strictly between 0 and 1"),
    (["run", "--rc-delta", "0"], "--rc-delta: must be strictly between 0 and 1"),
    (["run", "--rc-trials", "0"], "--rc-trials: must be >= 1"),
    (["run", "--rc-rules", "lttt"], "--rc-rules: unknown rule 'lttt'"),
    (["run", "--threads", "0"], "--threads: must be a positive number of CPU threads"),
    (["run", "--rc-eps", "0.1,,0.2"], "--rc-eps: expected comma-separated numbers, got '0.1,,0.2'"),
    (["run", "--claim-timeout", "inf"], "--claim-timeout: must be a positive, finite number of seconds"),
    (["run", "--slurm-chunk", "0"], "--slurm-*: these options are for --executor slurm"),
    (["run", "--slurm-parallel", "2"], "--slurm-*: these options are for --executor slurm"),
    (["time", "--batch-sizes", "0"], "--batch-sizes: batch sizes must be >= 1"),
    (["time", "--batch-sizes", "a"], "--batch-sizes: expected comma-separated whole numbers"),
    (["time", "--repeats", "0"], "--repeats: must be a positive number of timing repeats"),
    (["time", "--threads", "0"], "--threads: must be a positive number of CPU threads"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_every_bad_option_is_one_line(argv, message, done, tmp_path, capsys):
    cmd, *rest = argv
    target = _write(tmp_path, ONE) if cmd == "run" else str(done / "out")
    extra = ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--quiet"] if cmd == "run" else []
    assert main([cmd, target, *rest, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: ") and "\n" not in err and message in err, err


def test_time_refuses_damaged_weights_and_unrelated_files_in_one_line(done, tmp_path, capsys):
    _copy(done, tmp_path)
    out = tmp_path / "out"
    _truncate(next((out / "weights").glob("*.safetensors")))
    assert main(["time", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its saved weights" in err and "are damaged (truncated" in err and "\n" not in err
    junk = tmp_path / "junk"
    (junk / "cells").mkdir(parents=True)
    (junk / "cells" / "a.json").write_bytes(os.urandom(100))
    (junk / "cells" / "b.json").write_text('{"a": 1}')
    assert main(["time", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("exitbench: error: ") and "no readable cell results" in err[-1]
    assert all(line.startswith("exitbench: warning: skipping") for line in err[:-1]) and len(err) == 3


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_unwritable_report_out_is_one_line(cmd, done, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    results = str(done / "out")
    argv = [cmd, results, *([results] if cmd == "compare" else []), "--out", str(blocker / "x" / "y.md")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --out: cannot write to") and "\n" not in err, err
