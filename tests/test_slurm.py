"""The Slurm executor on a real cluster (``scripts/slurm_local.sh up`` starts one on this machine): a job
array waited for with progress gives the results of the local executor; a task that dies is named in one
line with its log; what the cluster cannot run is refused before anything is submitted. Skipped where no
Slurm controller answers. Preemption (requeue, time limit) is measured by scripts/slurm_check.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exitbench.cli import main
from tests.test_executors import _outcome
from tests.test_runner import TINY, _write


def _cluster_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return r.returncode == 0 and " is UP" in r.stdout


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not _cluster_answers(), reason="needs a Slurm cluster (scripts/slurm_local.sh up)")]
MATRIX = {**TINY, "risk_control": False}


def test_a_waited_job_array_gives_the_local_results_with_progress_and_a_report(tmp_path, capsys):
    matrix = _write(tmp_path, MATRIX)
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    common = ["--no-latency", "--quiet", "--cache", str(tmp_path / "cache")]
    assert main(["run", matrix, "--out", str(local), *common]) == 0
    assert main(["run", matrix, "--out", str(slurm), *common, "--executor", "slurm", "--slurm-time", "10",
                 "--wait", "--report"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 Slurm tasks" in out and "2 ok, 0 errors, 0 without a result" in out
    assert "exitbench: 2/2 cells done, 0 failed" in out  # --quiet: progress as lines
    assert len(_outcome(slurm)) == 2 and _outcome(slurm) == _outcome(local)
    assert (slurm / "summary.csv").exists() and (slurm / "report" / "report.md").exists()
    assert not list((slurm / "claims").glob("*.lock"))  # every task released its claims


def test_a_task_that_dies_is_named_in_one_line_with_its_log(tmp_path):
    matrix = _write(tmp_path, {**MATRIX, "methods": [{**MATRIX["methods"][0], "grid": {"lam": [0.5]},
                                                      "hparams": {**MATRIX["methods"][0]["hparams"], "epochs": 200}}]})
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "exitbench", "run", matrix, "--out", str(out), "--no-latency",
                          "--quiet", "--cache", str(tmp_path / "cache"), "--executor", "slurm", "--slurm-time", "10",
                          "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not list(out.glob("claims/*.lock")) and time.time() < deadline:  # its task is at work
        time.sleep(0.5)
    (task,) = [d.name for d in (out / "slurm").iterdir() if d.name[0].isdigit()]  # a one-task array: its job id
    subprocess.run(["scancel", task], check=True)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 1, stdout + stderr
    (line,) = [ln for ln in stderr.splitlines() if f"task {task} ended" in ln]
    assert f"(log: {out / 'slurm' / task / (task + '_0_log.err')})" in line
    assert "0 ok, 0 errors, 1 without a result" in stdout


def test_what_the_cluster_cannot_run_is_refused_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    matrix, out = _write(tmp_path, MATRIX), tmp_path / "out"
    assert main(["run", matrix, "--out", str(out), "--executor", "slurm", "--slurm-partition", "debgu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --slurm-partition: no partition 'debgu' on this cluster; did you mean")
    assert "\n" not in err and not (out / "slurm").exists()
    # sbatch is here, but the controller this configuration names does not answer
    conf = tmp_path / "slurm.conf"
    text = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    conf.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "", text) + "\nSlurmctldPort=6899\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert main(["run", matrix, "--out", str(out), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --executor slurm: no Slurm controller answers") and "\n" not in err
    assert not (out / "slurm").exists()
