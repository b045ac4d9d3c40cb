"""Several runners on one results directory: a cell is claimed before it runs, claimed cells are left to
their runner, a dead runner's claim is taken over, a shared backbone is trained once, nothing is
computed twice. The concurrent tests start real `exitbench run` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exitbench.cli import main
from exitbench.core.claims import holder, try_claim, wait_for
from tests.test_runner import TINY, _write

FOUR = {**TINY, "methods": [{**TINY["methods"][0], "grid": {"lam": [0.5, 1.0, 1.5, 2.0]}}], "risk_control": False}


def test_one_claim_at_a_time_and_release(tmp_path):
    lock = tmp_path / "a.lock"
    first = try_claim(lock)
    assert first is not None and first.held() and holder(lock).endswith(f":{os.getpid()}")
    assert try_claim(lock) is None  # held and heartbeating
    first.release()
    assert not lock.exists()
    with try_claim(lock) as again:
        assert again.held()
    assert not lock.exists()


def test_a_stale_claim_is_taken_over_once(tmp_path):
    lock = tmp_path / "a.lock"
    dead = try_claim(lock, stale_after=3600)
    dead._stop.set()  # its runner died: no more heartbeats
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert try_claim(lock, stale_after=3600) is None  # not stale by that measure
    taker = try_claim(lock, stale_after=60)
    assert taker is not None and taker.held() and not dead.held()
    assert try_claim(lock, stale_after=60) is None  # the new claim is fresh
    dead.release()  # the late release of a taken-over claim leaves the new one alone
    assert lock.exists() and taker.held()
    taker.release()


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path):
    lock = tmp_path / "a.lock"
    with try_claim(lock, stale_after=0.4):
        old = time.time() - 10
        os.utime(lock, (old, old))
        time.sleep(0.4)
        assert time.time() - lock.stat().st_mtime < 0.4  # touched again by the heartbeat thread
        assert try_claim(lock, stale_after=0.4) is None


def test_a_claim_whose_process_is_gone_on_this_host_is_taken_at_once(tmp_path):
    lock = tmp_path / "a.lock"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = try_claim(lock)  # a fresh heartbeat, written as if by that (now finished) process
    dead._stop.set()
    owner = json.loads(lock.read_text())
    lock.write_text(json.dumps({**owner, "pid": int(gone.stdout)}))
    taker = try_claim(lock)  # the default stale_after (600 s) does not matter: its process is gone
    assert taker is not None and "its process is gone" in taker.taken_from and str(int(gone.stdout)) in taker.taken_from
    assert try_claim(lock) is None  # this process is alive: its claim is not taken
    taker.release()
    other_host = try_claim(lock)
    other_host._stop.set()
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "elsewhere", "pid": int(gone.stdout)}))
    assert try_claim(lock) is None  # another host's process cannot be checked: its heartbeat decides


def test_a_reused_pid_does_not_keep_a_dead_claim_alive(tmp_path):
    lock = tmp_path / "a.lock"
    dead = try_claim(lock)
    dead._stop.set()
    # as if written by an earlier process that had this PID (a requeued task in a fresh PID namespace)
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "token": "old", "started": 1}))
    taker = try_claim(lock)
    assert taker is not None and "its PID is now another process's" in taker.taken_from
    taker.release()


def _slurm_env(monkeypatch, job: str, task: str, restart: int) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))


def test_a_requeued_task_takes_its_own_earlier_claim_at_once(tmp_path, monkeypatch):
    lock = tmp_path / "a.lock"
    _slurm_env(monkeypatch, "7", "3", 0)
    first = try_claim(lock)
    first._stop.set()
    assert json.loads(lock.read_text())["slurm"] == {"job": "7_3", "restart": 0}
    assert holder(lock).endswith("(slurm 7_3)")
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "node-a"}))  # it ran on another node
    assert try_claim(lock) is None  # the same life of the task: its claim stands
    _slurm_env(monkeypatch, "7", "3", 1)  # requeued: the fresh heartbeat does not matter
    again = try_claim(lock)
    assert again is not None and "this Slurm task (7_3) before its requeue" in again.taken_from
    again.release()


@pytest.mark.parametrize(("answer", "taken"), [("RUNNING", False), ("PENDING", True), ("", True)])
def test_a_claim_whose_slurm_job_is_not_running_is_taken_at_once(tmp_path, monkeypatch, answer, taken):
    from exitbench.core import claims

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho '{answer}'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(claims, "_squeue_memo", {})
    lock = tmp_path / "a.lock"
    _slurm_env(monkeypatch, "7", "1", 0)
    other = try_claim(lock)
    other._stop.set()
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "node-b"}))
    _slurm_env(monkeypatch, "7", "2", 0)  # another task of the array finds it
    got = try_claim(lock)
    assert (got is not None) == taken
    if taken:
        assert f"its Slurm job 7_1 is {'pending' if answer else 'no longer queued'}" in got.taken_from
        got.release()


def test_release_all_frees_every_claim_of_this_process(tmp_path):
    from exitbench.core.claims import release_all

    release_all()  # what earlier tests left held
    a, b = try_claim(tmp_path / "a.lock"), try_claim(tmp_path / "b.lock")
    assert release_all() == 2 and not (tmp_path / "a.lock").exists() and not (tmp_path / "b.lock").exists()
    a.release()  # the owner's own release afterwards is harmless
    assert release_all() == 0 and not b.held()


def test_waiting_returns_when_the_work_is_done_elsewhere(tmp_path):
    lock, done = tmp_path / "bb.lock", tmp_path / "bb.done"
    other = try_claim(lock)
    done.write_text("weights")
    assert wait_for(lock, done.exists, poll=0.01) is None  # done: nothing to claim
    other.release()


def _runner(out: Path, matrix: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "exitbench.cli", "run", matrix, "--out", str(out), "--cache",
                             str(out.parent / "cache"), "--quiet", "--no-latency", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def test_two_runners_compute_each_cell_once(tmp_path):
    matrix, out = _write(tmp_path, FOUR), tmp_path / "out"
    a, b = _runner(out, matrix), _runner(out, matrix)
    logs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, logs
    results = _results(out)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    # every cell computed by exactly one of them: the other waited and counted it done elsewhere
    ok = [int(log.split(" ok,")[0].rsplit(" ", 1)[-1]) for log in logs]
    assert sum(ok) == 4, logs
    # the one backbone all four need was trained once, by whichever runner claimed it first
    assert sum(not r["backbone"]["training"]["cached"] for r in results) == 1
    assert not list((out / "claims").glob("*.lock")) and not list((tmp_path / "cache").glob("*.lock"))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_a_killed_runner_is_taken_over(tmp_path, capsys):
    matrix, out = _write(tmp_path, FOUR), tmp_path / "out"
    a = _runner(out, matrix)
    _wait_for_a_claim(out)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert list((out / "claims").glob("*.lock"))  # its claim is left behind
    # the default --claim-timeout (600 s): its process is gone on this host, so the claim is taken at once
    assert main(["run", matrix, "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet", "--no-latency"]) == 0
    results = _results(out)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    log = capsys.readouterr().out
    assert "took over" in log and "its process is gone" in log and f":{a.pid}" in log
    assert not list((out / "claims").glob("*.lock"))


def test_sigterm_releases_the_claims_in_one_line(tmp_path, capsys):
    matrix, out = _write(tmp_path, FOUR), tmp_path / "out"
    a = _runner(out, matrix)
    _wait_for_a_claim(out)
    a.send_signal(signal.SIGTERM)
    log = a.communicate(timeout=120)[0]
    assert a.returncode == 143 and "Traceback" not in log, log
    assert log.strip().splitlines()[-1].startswith("exitbench: stopped by SIGTERM; claims released")
    assert not list((out / "claims").glob("*.lock")) and not list((tmp_path / "cache").glob("*.lock"))
    assert main(["run", matrix, "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet", "--no-latency"]) == 0
    assert len(_results(out)) == 4 and "took over" not in capsys.readouterr().out  # nothing left to take over


def _wait_for_a_claim(out: Path) -> None:
    deadline = time.time() + 300
    while not list((out / "claims").glob("*.lock")) and time.time() < deadline:  # it has claimed a cell
        time.sleep(0.05)


def test_a_claims_directory_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, whoever runs the test
    code = main(["run", _write(tmp_path, TINY), "--out", str(tmp_path / "out"), "--claims", str(blocker / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("exitbench: error: --claims: cannot create lock files in") and "\n" not in err
    assert main(["run", _write(tmp_path, TINY), "--out", str(tmp_path / "out"), "--claim-timeout", "0"]) == 2
    assert "--claim-timeout: must be a positive, finite number of seconds" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "cells").glob("*.json"))
