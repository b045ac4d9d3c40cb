"""Result schema, the atomic store, and loading results into pandas.

One JSON file per cell (asv/TorchBench style): a schema version, the resolved config, a machine
fingerprint, and the measurements; failures are recorded, not dropped. This module imports no torch,
so reports can read results on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: setting_id, analysis keys, saved weights, population-judged risk control

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


def tmp_path(path: str | Path) -> Path:
    """The temporary sibling a writer fills before an atomic rename: ``.NAME.PID.tmp``. The PID lets
    :func:`remove_orphans` tell a dead writer's leftovers from a live one's."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary sibling, which then replaces ``path`` in one rename: readers see
    the old file or the whole new one. The temporary file is removed if ``write`` fails."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temporary files in ``folder`` left by writers that are no longer running (a kill
    between write and rename); returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        pid = p.name[:-4].rsplit(".", 1)[-1]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = int(pid) != os.getpid()
            except OSError:
                alive = False
        if not alive:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
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


def check_schema(result: dict, path: str | Path) -> None:
    """A result written by a newer exitbench cannot be read safely: one-line UserError."""
    from exitbench.errors import UserError

    v = result.get("schema_version")
    if isinstance(v, int) and v > SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {v} is newer than this exitbench's ({SCHEMA_VERSION}); "
                        "upgrade exitbench, or use another results directory")


MANIFEST = "manifest.json"


def write_manifest(results_dir: str | Path, matrix: str, cells: list[str]) -> None:
    """Record which cells (file stems under cells/) the latest matrix run of ``results_dir`` covers;
    reports and compare use these and list any other cells found as not part of the latest run."""
    from datetime import datetime, timezone

    write_json_atomic(Path(results_dir) / MANIFEST, {"schema_version": SCHEMA_VERSION, "matrix": matrix,
                                                      "written": datetime.now(timezone.utc).isoformat(),
                                                      "cells": list(cells)})


def read_manifest(results_dir: str | Path) -> dict | None:
    """The manifest of ``results_dir``, or None when there is none (results from before manifests)."""
    p = Path(results_dir) / MANIFEST
    try:
        m = read_result(p)
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("cells"), list) else None


def latency_noisy(result: dict, batch_size: int) -> bool:
    """Whether either record of the backbone / dynamic pair timed at ``batch_size`` is flagged noisy:
    their ratio is then not to be trusted."""
    return any(x.get("noisy") for x in result.get("latency") or []
               if x.get("batch_size") == batch_size and x.get("variant") in ("backbone", "dynamic"))


def latest_run(results_dir: str | Path, paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split result ``paths`` into (part of the latest matrix run, not part of it) by the directory's
    manifest; without a manifest every path counts as part of it."""
    m = read_manifest(results_dir)
    if m is None:
        return list(paths), []
    names = set(m["cells"])
    return [p for p in paths if p.stem in names], [p for p in paths if p.stem not in names]


def summary_rows(results: list[dict]) -> list[dict]:
    """One flat row per (cell, operating point) plus one per backbone reference: the CSV summary."""
    rows = []
    labels = setting_labels(results)
    for r in results:
        c = r.get("config", {})
        base = {"dataset": c.get("dataset"), "backbone": c.get("backbone"), "method": c.get("method"),
                "setting": labels.get(label_key(r), setting_label(c)), "setting_id": result_setting_id(r),
                "seed": c.get("seed"), "status": r.get("status"), "cell": r.get("cell")}
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
                        row[f"noisy_b{bs}"] = latency_noisy(r, bs)
            row["train_seconds"] = r.get("training", {}).get("seconds")
            rows.append(row)
    return rows


# What a method setting is: everything that makes two cells of one (dataset, backbone) panel more
# than seeds of each other. Seed, dataset and backbone are the other axes; evaluation settings are
# re-analysed in place, so they are not part of it.
SETTING_FIELDS = ("method", "method_version", "hparams", "init", "backbone_training", "weights", "small_stem",
                  "dataset_options")


def setting_id(config: dict) -> str:
    """The identity of a cell's method setting: a short hash of its full resolved configuration
    (``SETTING_FIELDS``; dataset options without ``root``/``download``, which change where data come from,
    not what they are). Seeds are pooled only within one setting_id; labels are for reading only."""
    d = {k: config.get(k) for k in SETTING_FIELDS}
    d["dataset_options"] = _dataset_options(config)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _dataset_options(config: dict) -> dict[str, Any]:
    """Dataset options that change what the data are (not ``root``/``download``: where they come from)."""
    return {k: v for k, v in (config.get("dataset_options") or {}).items() if k not in ("root", "download")}


def result_setting_id(result: dict) -> str:
    """The stored ``setting_id`` of a result, or the one its config gives (results from before it was stored)."""
    return result.get("setting_id") or setting_id(result.get("config") or {})


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def setting_label(config: dict) -> str:
    """A short label of a cell's method setting from its swept keys, e.g. ``pteenet lam=1`` (not unique:
    see :func:`setting_labels`)."""
    hp = config.get("hparams", {})
    swept = config.get("swept", [])
    return " ".join([config.get("method", "?"), *(f"{k}={_fmt(hp.get(k))}" for k in swept)])


def _setting_fields(config: dict) -> dict[str, Any]:
    out = {k: v for k, v in (config.get("hparams") or {}).items()}
    for k in ("init", "weights", "small_stem", "method_version"):
        out[k] = config.get(k)
    for k, v in (config.get("backbone_training") or {}).items():
        out[f"backbone.{k}"] = v
    for k, v in _dataset_options(config).items():
        out[f"data.{k}"] = v
    return out


def setting_labels(results: list[dict]) -> dict[tuple[str, str, str], str]:
    """:func:`label_key` -> a short label, unique within its (dataset, backbone) panel: the swept keys,
    plus every field that tells apart settings which would otherwise share a label (e.g.
    ``pteenet loss=v1`` / ``pteenet loss=v2``)."""
    by_id = {label_key(r): r["config"] for r in results if r.get("config")}
    groups: dict[tuple, list[tuple]] = {}
    for sid, c in by_id.items():
        groups.setdefault((sid[0], sid[1], setting_label(c)), []).append(sid)
    out = {}
    for (_, _, label), sids in groups.items():
        if len(sids) == 1:
            out[sids[0]] = label
            continue
        fields = {sid: _setting_fields(by_id[sid]) for sid in sids}
        keys = sorted({k for f in fields.values() for k in f
                       if len({_fmt(g.get(k)) for g in fields.values()}) > 1})
        for sid in sids:
            out[sid] = " ".join([label, *(f"{k}={_fmt(fields[sid].get(k))}" for k in keys)])
    seen: dict[tuple, int] = {}
    for sid, lab in out.items():
        seen[sid[:2], lab] = seen.get((sid[:2], lab), 0) + 1
    return {sid: (f"{lab} [{sid[2][:6]}]" if seen[sid[:2], lab] > 1 else lab) for sid, lab in out.items()}


def label_key(result: dict) -> tuple[str, str, str]:
    """The key of a result in :func:`setting_labels`."""
    c = result.get("config") or {}
    return (c.get("dataset"), c.get("backbone"), result_setting_id(result))
