"""``exitbench time``: stored cells re-timed from their saved weights on another device (here: the CPU
again, with other batch sizes), records appended, bad input one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exitbench.cli import main
from tests.test_runner import quick_run  # noqa: F401  (the tiny matrix, run once for this module)


@pytest.fixture
def results(quick_run, tmp_path):  # noqa: F811  (the fixture imported above)
    _, out, _ = quick_run
    d = tmp_path / "R"
    shutil.copytree(out, d)
    return d


def _cells(d):
    return {p.name: json.loads(p.read_text()) for p in sorted((d / "cells").glob("*.json"))}


def test_time_appends_records_for_new_batch_sizes_and_keeps_the_rest(results, capsys):
    before = _cells(results)
    args = ["time", str(results), "--device", "cpu", "--batch-sizes", "4", "--repeats", "2", "--threads", "1"]
    assert main(args) == 0
    assert "re-timed 2 cells" in capsys.readouterr().out
    for name, r in _cells(results).items():
        old = {(x["device"], x["variant"], x["batch_size"]) for x in before[name]["latency"]}
        new = {(x["device"], x["variant"], x["batch_size"]): x for x in r["latency"]}
        assert old <= set(new)  # nothing timed before is lost
        added = [x for k, x in new.items() if k[2] == 4]
        assert {x["variant"] for x in added} >= {"backbone", "compaction"} and all(x["inputs"] == "test split"
                                                                                  for x in added)
        assert r["operating_points"] == before[name]["operating_points"]  # thresholds untouched


def test_time_refuses_what_it_cannot_do_in_one_line(results, capsys, monkeypatch):
    cell = next((results / "cells").glob("*.json"))
    r = json.loads(cell.read_text())
    # a method plugin that is not installed here
    cell.write_text(json.dumps({**r, "config": {**r["config"], "method": "not_installed"}}))
    assert main(["time", str(results), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown method 'not_installed'" in err and "install the plugin" in err and "\n" not in err
    # weights that are gone
    cell.write_text(json.dumps(r))
    (results / r["weights"]).unlink()
    assert main(["time", str(results), "--device", "cpu"]) == 2
    assert "no saved weights" in capsys.readouterr().err
    # a device that is not there: nothing is written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = {p.name: p.read_text() for p in (results / "cells").glob("*.json")}
    assert main(["time", str(results), "--device", "cuda"]) == 2
    assert "cuda requested" in capsys.readouterr().err
    assert before == {p.name: p.read_text() for p in (results / "cells").glob("*.json")}


def test_weights_that_do_not_fit_are_named(results, capsys):
    cells = sorted((results / "cells").glob("*.json"))
    a = json.loads(cells[0].read_text())
    from safetensors.torch import save_file  # weights of some other network in the cell's weights file

    save_file({"x": torch.zeros(1)}, str(results / a["weights"]))
    assert main(["time", str(results), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "saved weights do not fit" in err and "\n" not in err.strip()


def test_without_the_data_the_inputs_are_same_shaped_random_tensors(tmp_path):
    from exitbench.benchmarks.config import expand
    from exitbench.benchmarks.retime import _inputs

    cell = expand({"datasets": [{"name": "cifar10", "root": str(tmp_path)}], "backbones": ["test_resnet"],
                   "methods": ["sdn"], "seeds": [3]})[0]
    x, note = _inputs(cell)
    assert tuple(x.shape[1:]) == (3, 32, 32) and "random" in note
    assert torch.equal(x, _inputs(cell)[0])  # seeded


def test_the_time_options_replace_the_cells_own_timing_settings():
    from exitbench.benchmarks.retime import TimeOptions
    from exitbench.core.spec import Evaluation

    ev = Evaluation(latency=False, latency_batch_sizes=(1, 16), latency_repeats=7, threads=3)
    own = TimeOptions().protocol(ev)  # re-timing times even a cell that was not timed; no sizes: the device's
    assert (own.enabled, own.batch_sizes, own.repeats, own.threads, own.fast) == (True, (), 7, 3, "none")
    asked = TimeOptions((4,), 2, 1, "compile").protocol(ev)
    assert (asked.batch_sizes, asked.repeats, asked.threads, asked.timed_variants[-1]) == ((4,), 2, 1, "fast-compile")
