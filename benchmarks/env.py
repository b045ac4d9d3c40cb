"""The machine fingerprint stored with every result: enough to tell two runs' set-ups apart."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("exitbench", "torch", "torchvision", "timm", "ptflops", "numpy", "pandas")


def env_fingerprint(device: Any = "cpu", threads: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Package versions, git commit, machine and device (name, driver, CUDA, cuDNN on a GPU; the dtype
    timed): enough to tell two runs' set-ups apart."""
    import torch

    from exitbench.benchmarks.device import device_env

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "git_commit": _git_commit(),
        **device_env(torch.device(device), dtype),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

