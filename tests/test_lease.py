"""Device leases: a timer waits until another process's cell on the same device has finished, and a process
that dies gives its device back."""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from exitbench.benchmarks import lease

HOLD = """
import sys, time, torch
from exitbench.benchmarks import lease
with lease.working(torch.device("cpu")):
    print("holding", flush=True)
    time.sleep(float(sys.argv[1]))
print(time.time(), flush=True)
"""


def _worker(tmp_path, monkeypatch, seconds: float) -> subprocess.Popen:
    monkeypatch.setenv("EXITBENCH_LEASES", str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def test_timing_waits_for_another_process_working_on_the_device(tmp_path, monkeypatch):
    p = _worker(tmp_path, monkeypatch, 1.0)
    with lease.timing(torch.device("cpu")):
        entered = time.time()
    released = float(p.stdout.readline())
    p.wait()
    assert entered >= released  # not before the other process let the device go


def test_a_process_that_is_killed_gives_its_device_back(tmp_path, monkeypatch):
    p = _worker(tmp_path, monkeypatch, 600.0)
    p.kill()
    p.wait()
    start = time.time()
    with lease.timing(torch.device("cpu")):
        assert time.time() - start < 5


def test_a_cell_that_times_inside_its_own_work_does_not_wait_for_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITBENCH_LEASES", str(tmp_path))
    cpu = torch.device("cpu")
    with lease.working(cpu), lease.working(cpu):  # nested: one hold
        with lease.timing(cpu):
            pass
        assert lease._held["cpu"][1] == 2
    assert "cpu" not in lease._held
