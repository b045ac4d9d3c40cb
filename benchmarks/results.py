"""Result schema, the atomic store, and loading results into pandas.

One JSON file per cell (asv/TorchBench style): a schema version, the resolved config, a machine
fingerprint, and the measurements; failures are recorded, not dropped. This module imports no torch,
so reports can read results on any machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# Direction of every metric in the schema (lm-evaluation-harness style): comparisons and reports
# read it instead of guessing.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "agreement": True,
    "test_accuracy": True,
    "rel_macs_strict": False,
    "rel_macs_paper": False,
    "median_ms": False,
    "iqr_ms": False,
    "latency_ratio": False,
    "realisation": True,
    "seconds_per_epoch": False,
}

PACKAGES = ("exitbench", "torch", "torchvision", "timm", "ptflops", "numpy", "pandas")


def env_fingerprint(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Package versions, git commit, machine and device: enough to tell two runs' set-ups apart."""
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
        "device": device,
        "threads": threads,
        "git_commit": _git_commit(),
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


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def read_result(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def result_paths(results_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(results_dir).glob("cells/*.json"))


def load_results(results_dir: str | Path) -> list[dict]:
    """Every cell result under ``results_dir/cells`` (unreadable files are skipped with a warning)."""
    out = []
    for p in result_paths(results_dir):
        try:
            out.append(read_result(p))
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping unreadable result {p}: {e}")
    return out


def summary_rows(results: list[dict]) -> list[dict]:
    """One flat row per (cell, operating point) plus one per backbone reference: the CSV summary."""
    rows = []
    for r in results:
        c = r.get("config", {})
        base = {"dataset": c.get("dataset"), "backbone": c.get("backbone"), "method": c.get("method"),
                "setting": setting_label(c), "seed": c.get("seed"), "status": r.get("status"), "cell": r.get("cell")}
        if r.get("status") != "ok":
            rows.append({**base, "error": r.get("error") or r.get("reason")})
            continue
        b = r["backbone"]
        lat = {(x["variant"], x["batch_size"]): x for x in r.get("latency", [])}
        for op in r.get("operating_points", []):
            if not op.get("feasible", True):  # no threshold met the target on calibration
                rows.append({**base, "operating_point": op["name"], "feasible": False})
                continue
            row = {**base, "operating_point": op["name"], "threshold": op.get("threshold"),
                   "backbone_test_accuracy": b["test_accuracy"], "backbone_gmacs": b["macs"] / 1e9}
            for split in ("calibration", "test"):
                for k in ("accuracy", "agreement", "rel_macs_strict", "rel_macs_paper"):
                    row[f"{split}_{k}"] = op[split][k]
            row["test_exit_fractions"] = " ".join(f"{f:.3f}" for f in op["test"]["exit_fractions"])
            if op.get("latency"):
                for bs in sorted({x["batch_size"] for x in r.get("latency", [])}):
                    dyn = lat.get(("dynamic", bs))
                    if dyn:
                        row[f"latency_ratio_b{bs}"] = dyn["latency_ratio"]
                        row[f"realisation_b{bs}"] = dyn["realisation"]
            row["train_seconds"] = r.get("training", {}).get("seconds")
            rows.append(row)
    return rows


def setting_label(config: dict) -> str:
    """A short label of a cell's method setting, e.g. ``pteenet lam=1``."""
    hp = config.get("hparams", {})
    swept = config.get("swept", [])
    parts = [f"{k}={hp[k]:g}" if isinstance(hp.get(k), float) else f"{k}={hp.get(k)}" for k in swept]
    return " ".join([config.get("method", "?"), *parts])
