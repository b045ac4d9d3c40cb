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

from exitbench.claims import holder, try_claim, wait_for
from exitbench.cli import main
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
    a = _runner(out, matrix, "--claim-timeout", "2")
    deadline = time.time() + 300
    while not list((out / "claims").glob("*.lock")) and time.time() < deadline:  # a has claimed a cell
        time.sleep(0.05)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert list((out / "claims").glob("*.lock"))  # its claim is left behind
    assert main(["run", matrix, "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet", "--no-latency",
                 "--claim-timeout", "2"]) == 0
    results = _results(out)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)
    assert "took over" in capsys.readouterr().out
    assert not list((out / "claims").glob("*.lock"))


def test_a_claims_directory_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, whoever runs the test
    code = main(["run", _write(tmp_path, TINY), "--out", str(tmp_path / "out"), "--claims", str(blocker / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("exitbench: error: --claims: cannot create lock files in") and "\n" not in err
    assert main(["run", _write(tmp_path, TINY), "--out", str(tmp_path / "out"), "--claim-timeout", "0"]) == 2
    assert "--claim-timeout: must be a positive number of seconds" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "cells").glob("*.json"))
