"""scripts/gpu_check.py's paths that need no GPU: where it cannot run, it stops at once with one line saying
what is missing and exit code 2, having written its summary (the machine it found, the dependency floors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    return proc, json.loads((out / "summary.json").read_text())


def test_without_a_wheelhouse_it_names_it_and_the_command_that_builds_it(tmp_path):
    proc, summary = _run(tmp_path, "--wheelhouse", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"no wheelhouse at {tmp_path / 'nowhere'}" in proc.stderr and "scripts/build_wheelhouse.sh" in proc.stderr
    assert summary["result"].startswith("not run: no wheelhouse")


def test_a_wheelhouse_without_exitbench_is_refused(tmp_path):
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "ptflops-0.7.4-py3-none-any.whl").write_bytes(b"")
    proc, _ = _run(tmp_path, "--wheelhouse", str(tmp_path / "wh"))
    assert proc.returncode == 2 and "no exitbench wheel in" in proc.stderr and "(1 wheels there)" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without CUDA")
def test_without_cuda_it_stops_after_recording_the_machine(tmp_path):
    proc, summary = _run(tmp_path, "--no-install")
    assert proc.returncode == 2 and "no CUDA device: this machine has" in proc.stderr
    assert "\n" not in proc.stderr.strip()
    env = summary["environment"]
    assert env["cuda_available"] is False and env["torch"] == torch.__version__
    floors = {f["package"]: f for f in env["floors"]}
    assert {"torch", "timm", "ptflops", "submitit", "pandas"} <= set(floors)
    assert floors["torch"]["meets"] and floors["torch"]["floor"] == "2.4.1"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "not run: no CUDA device" in md and "| torch | 2.4.1 |" in md
