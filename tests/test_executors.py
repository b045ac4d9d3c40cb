"""Executors: names and Slurm options checked in one line; local:N (submitit's local executor) gives the
results the in-process runner gives; --executor slurm submits one job array with the options asked (a
faked sbatch records the script), and a submitted task, run as Slurm would, computes its cells."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exitbench.benchmarks.executors import EXECUTORS, Executor, Finished, Local, get_executor
from exitbench.benchmarks.slurm import parse_slurm_time, slurm_options
from exitbench.cli import main
from exitbench.core.errors import UserError
from tests.test_claims import FOUR
from tests.test_runner import TINY, _write


def _args(**kw):
    from exitbench.cli import build_parser

    return build_parser().parse_args(["run", *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]])


def test_executor_names():
    assert isinstance(get_executor("local", _args()), Local) and get_executor("local", _args()).workers == 1
    assert get_executor("local:3", _args()).workers == 3 and get_executor("local:3", _args()).shares_work
    with pytest.raises(UserError, match=r"^--executor: 'local:0': local:N needs a whole number of workers N >= 1"):
        get_executor("local:0", _args())
    with pytest.raises(UserError, match=r"^--executor: unknown executor 'slurn'; did you mean 'slurm'"):
        get_executor("slurn", _args())
    with pytest.raises(UserError, match=r"^--slurm-\*: these options are for --executor slurm"):
        get_executor("local", _args(slurm_time="4h"))
    with pytest.raises(UserError, match=r"^--executor: slurm takes no ':4'; give its options as --slurm-\*$"):
        get_executor("slurm:4", _args())


def test_an_executor_is_a_registry_entry_a_plugin_can_add(tmp_path, monkeypatch, capsys):
    class Serial(Executor):
        """runs the cells one by one in this process, in reverse order"""

        name = "serial_for_test"

        def run(self, cells, out_dir, cache_dir, kw, *, progress):
            from exitbench.benchmarks.runner import run_matrix

            return Finished(run_matrix(cells[::-1], out_dir, cache_dir, progress=False, **kw))

    monkeypatch.setattr(EXECUTORS, "_entries", dict(EXECUTORS._entries))
    EXECUTORS.register("serial_for_test", Serial)
    assert "serial_for_test" in [n for n, _ in EXECUTORS.describe()]
    m = _write(tmp_path, TINY)
    assert main(["run", str(m), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                 "--executor", "serial_for_test", "--no-latency", "--quiet"]) == 0
    assert "ok, 0 errors" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "minutes"), [("90", 90), ("30:30", 31), ("04:00:00", 240), ("1-12:00", 2160),
                                               ("2-0", 2880), ("90m", 90), ("4h", 240), ("2d", 2880)])
def test_slurm_times(text, minutes):
    assert parse_slurm_time(text) == minutes


def test_bad_slurm_options_are_one_line_errors():
    with pytest.raises(UserError, match=r"^--slurm-time: cannot read 'soon' as a time limit"):
        slurm_options(None, "soon", None, None, None, 1, None)
    with pytest.raises(UserError, match=r"^--slurm-mem: '32 gigs' is not a Slurm memory size"):
        slurm_options(None, None, None, "32 gigs", None, 1, None)
    with pytest.raises(UserError, match=r"^--slurm-opt: 'account' is not KEY=VALUE"):
        slurm_options(None, None, None, None, ["account"], 1, None)
    with pytest.raises(UserError, match=r"^--slurm-chunk: must be at least 1"):
        slurm_options(None, None, None, None, None, 0, None)
    for zero in ("0", "00:00:00", "0m"):
        with pytest.raises(UserError, match=r"^--slurm-time: '.*' is no time at all"):
            slurm_options(None, zero, None, None, None, 1, None)
    with pytest.raises(UserError, match=r"^--slurm-gpus: 2 GPUs per task would leave all but one idle"):
        slurm_options(None, None, 2, None, None, 4, None)
    opts = slurm_options("gpu", "2h", 1, "32g", ["--account=proj", "qos=high"], 1, 8)
    assert opts == {"time": 120, "signal_delay_s": 90, "partition": "gpu", "gpus_per_node": 1, "mem": "32G",
                    "additional_parameters": {"account": "proj", "qos": "high"}, "array_parallelism": 8}
    assert slurm_options(None, "1", None, None, None, 1, None)["signal_delay_s"] == 20  # a short task: signal late


def _fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """``sbatch`` that records the script it is given and answers like Slurm; ``srun`` that does nothing; a
    controller that answers, with partitions ``gpu`` and ``debug`` on this host."""
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {record}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1" = ping ] && echo "Slurmctld(primary) at fake is UP" '
                                      '|| echo "$3"\n')
    (bin_dir / "sinfo").write_text('#!/bin/sh\ncase "$*" in *%R*) echo gpu; echo debug;; *) hostname;; esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_slurm_without_sbatch_or_with_stray_options_refuses_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, TINY), "--out", str(out), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --executor slurm: sbatch is not on PATH") and "\n" not in err
    assert main(["run", _write(tmp_path, TINY), "--out", str(out), "--slurm-partition", "gpu"]) == 2
    assert "--slurm-*: these options are for --executor slurm" in capsys.readouterr().err
    assert main(["run", _write(tmp_path, TINY), "--out", str(out), "--executor", "lokal"]) == 2
    assert "did you mean 'local'" in capsys.readouterr().err
    assert not out.exists() or not list((out / "cells").glob("*.json"))


def test_a_cluster_that_cannot_run_the_array_is_refused_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    record = _fake_slurm(tmp_path, monkeypatch)
    bin_dir, out = record.parent / "bin", tmp_path / "out"
    matrix = _write(tmp_path, TINY)

    def refused(extra: list[str], message: str) -> None:
        assert main(["run", matrix, "--out", str(out), "--cache", str(tmp_path / "cache"), "--executor", "slurm",
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
        assert not record.exists() and not (out / "slurm").exists()  # nothing submitted

    refused(["--slurm-partition", "gpus"], "--slurm-partition: no partition 'gpus' on this cluster; did you mean 'gpu'")
    refused(["--slurm-time", "0"], "--slurm-time: '0' is no time at all")
    (bin_dir / "sinfo").write_text('#!/bin/sh\ncase "$*" in *%R*) echo debug;; *) echo "node[1-2]";; esac\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1" = ping ] && echo "Slurmctld(primary) at c is UP" '
                                      '|| { echo node1; echo node2; }\n')
    refused([], f"--out: {out} is on this host's own disk, which the nodes (node1, node2) cannot write")
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "slurm_load_ctl_conf error: Unable to contact slurm '
                                      'controller (connect failure)" >&2; exit 1\n')
    refused([], "--executor slurm: no Slurm controller answers (scontrol ping: slurm_load_ctl_conf error: Unable "
                "to contact slurm controller (connect failure))")
    assert main(["run", matrix, "--out", str(out), "--wait"]) == 2
    assert "--wait: waits for a Slurm job array; it is for --executor slurm" in capsys.readouterr().err


def test_slurm_submits_one_array_with_the_options_and_its_tasks_compute_the_cells(tmp_path, capsys, monkeypatch):
    from submitit.core.utils import DelayedSubmission

    record = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["run", _write(tmp_path, TINY), "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-latency",
            "--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "2:00:00", "--slurm-gpus", "1",
            "--slurm-mem", "32G", "--slurm-opt", "account=proj", "--slurm-opt", "qos=high"]
    assert main(args) == 0
    assert "submitted 2 Slurm tasks (job array 4242)" in capsys.readouterr().out
    script = record.read_text()
    for line in ("--partition=gpu", "--time=120", "--gpus-per-node=1", "--mem=32G", "--account=proj", "--qos=high",
                 "--array=0-1", "--signal=USR2@90"):  # USR2 before the limit: submitit checkpoints and requeues
        assert f"#SBATCH {line}" in script, (line, script)
    assert json.loads((out / "manifest.json").read_text())["cells"]  # the parent wrote the whole run's manifest
    assert not list((out / "cells").glob("*.json"))  # nothing ran in the parent
    tasks = sorted((out / "slurm").glob("4242_*/4242_*_submitted.pkl"))
    assert len(tasks) == 2  # a task (and a log folder) per cell
    for t in tasks:  # what `srun python -m submitit.core._submit` does on a node, minus Slurm
        counts = DelayedSubmission.load(t).result()
        assert counts["ok"] == 1
    assert sorted(json.loads(p.read_text())["status"] for p in (out / "cells").glob("*.json")) == ["ok", "ok"]


def _outcome(out: Path) -> dict:
    """Per cell: what training and calibration produced (no timings)."""
    res = {}
    for p in sorted((out / "cells").glob("*.json")):
        r = json.loads(p.read_text())
        res[p.name] = ([e["test_accuracy"] for e in r["exits"]],
                       [(o["kind"], o.get("thresholds"), o.get("test")) for o in r["operating_points"]])
    return res


def test_shares_keep_the_cells_of_one_backbone_together():
    from exitbench.benchmarks.config import expand
    from exitbench.benchmarks.executors import shares

    cells = expand({**FOUR, "seeds": [0, 1]})  # two backbones (one per seed), four cells each
    parts = shares(cells, 2)
    assert sorted(len(p) for p in parts) == [4, 4] and all(len({c.seed for c in p}) == 1 for p in parts)
    assert len(shares(cells, 5)) == 2  # no empty workers


def test_local_workers_give_the_results_of_one_process(tmp_path, capsys):
    matrix = _write(tmp_path, {**TINY, "seeds": [0, 1], "risk_control": False})  # two backbones: two workers
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--no-latency", "--quiet", "--threads", "1"]
    assert main(["run", matrix, "--out", str(one), "--cache", str(tmp_path / "c1"), *common]) == 0
    assert main(["run", matrix, "--out", str(two), "--cache", str(tmp_path / "c2"), "--executor", "local:2",
                 *common]) == 0
    assert "4 ok" in capsys.readouterr().out.splitlines()[-4]
    assert len(_outcome(one)) == 4 and _outcome(one) == _outcome(two)
    assert len(list((two / "logs" / "local").rglob("*.out"))) == 2  # a log per worker
