"""Reading result files and pulling the numbers the tables and figures need out of them.

Pure Python + numpy on the stored JSON (``exitbench.results`` is the only harness module used, and it is
torch-free). Every operating point and budget choice here is made on the calibration split and reported
on test, as the runner did.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from exitbench.errors import UserError
from exitbench.results import (
    HIGHER_IS_BETTER,
    check_schema,
    label_key,
    latency_noisy,  # noqa: F401  (re-exported for tables and figures)
    latest_run,
    result_setting_id,  # noqa: F401  (re-exported for reports.compare)
    setting_label,
    setting_labels,
)

BUDGETS = (0.25, 0.5, 0.75, 1.0)
RISK_ORDER = ("gap-prediction", "gap-brier", "consistency-prediction", "consistency-brier")
RULE_ORDER = ("naive", "crc", "crc-raw", "ucb-wsr", "ucb-hb", "ucb-hoeffding", "ltt", "ucb-wsr-macs", "ltt-per-exit",
              "oracle", "random")
# Rules that promise P(risk > eps) <= delta, and the one that promises E[risk] <= eps (population risk).
HIGH_PROBABILITY_RULES = ("ucb-wsr", "ucb-hb", "ucb-hoeffding", "ltt", "ucb-wsr-macs", "ltt-per-exit")
EXPECTATION_RULES = ("crc",)
# no guarantee (crc-raw: only for monotone losses), or not deployable
BASELINE_RULES = ("naive", "crc-raw", "oracle", "random")


class ReportError(UserError):
    """A user mistake (bad path, no results): the CLI prints it as one line and exits with code 2."""


# --------------------------------------------------------------------------------------------- loading

def result_files(results_dir: str | Path) -> list[Path]:
    d = Path(results_dir)
    if not d.exists():
        raise ReportError(f"{d}: no such directory")
    if not d.is_dir():
        raise ReportError(f"{d}: not a directory (expected a results directory with cells/*.json)")
    paths = sorted((d / "cells").glob("*.json")) if (d / "cells").is_dir() else sorted(d.glob("*.json"))
    if not paths:
        raise ReportError(f"{d}: no result files (expected {d / 'cells'}/*.json)")
    return paths


def load_cells(results_dir: str | Path, all_cells: bool = False) -> list[dict]:
    """Every readable cell result of the latest run under ``results_dir/cells`` (or ``results_dir``
    itself), each with ``_path``, ``_mtime`` and a unique short ``_label`` added.
    Cells the directory's manifest does not list are left out, and named on stderr, unless
    ``all_cells``. Unreadable files are skipped with a warning on stderr."""
    paths, others = latest_run(results_dir, result_files(results_dir))
    if others and not all_cells:
        names = ", ".join(p.stem for p in others[:3]) + (", ..." if len(others) > 3 else "")
        print(f"exitbench: note: {len(others)} cells in {results_dir} are not part of the latest run ({names}); "
              "--all includes them", file=sys.stderr)
    out = []
    for p in paths + (others if all_cells else []):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            print(f"exitbench: warning: skipping unreadable result {p}: {e}", file=sys.stderr)
            continue
        if not isinstance(r, dict) or "status" not in r:
            print(f"exitbench: warning: skipping {p}: not a cell result", file=sys.stderr)
            continue
        check_schema(r, p)
        r["_path"] = str(p)
        r["_mtime"] = p.stat().st_mtime
        out.append(r)
    if not out:
        raise ReportError(f"{results_dir}: no readable cell results")
    labels = setting_labels(out)
    for r in out:
        r["_label"] = labels.get(label_key(r)) or setting(r)
    return out


# ---------------------------------------------------------------------------------------------- keys

def natural_key(s: Any) -> tuple:
    """Sort ``lam=2`` before ``lam=10``."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(s))
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def config(r: dict) -> dict:
    return r.get("config") or {}


def panel_key(r: dict) -> tuple[str, str]:
    c = config(r)
    return (str(c.get("dataset", "?")), str(c.get("backbone", "?")))


def setting(r: dict) -> str:
    """The short label of a result's method setting (unique per setting_id among the loaded results)."""
    if r.get("_label"):
        return r["_label"]
    c = config(r)
    return setting_label(c) if c else str(r.get("cell", "?"))


def setting_key(r: dict) -> tuple[str, str, str]:
    return (*panel_key(r), setting(r))


def seed(r: dict) -> Any:
    return config(r).get("seed")


def ok(results: Iterable[dict]) -> list[dict]:
    return [r for r in results if r.get("status") == "ok"]


def group(results: Iterable[dict], key) -> dict:
    """``key(r) -> tuple`` groups, sorted naturally by key."""
    g: dict = defaultdict(list)
    for r in results:
        g[key(r)].append(r)
    return {k: sorted(g[k], key=lambda r: natural_key(seed(r))) for k in sorted(g, key=natural_key)}


def by_setting(results: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    return group(ok(results), setting_key)


def settings(results: Iterable[dict]) -> list[str]:
    """Every method setting label, in the order used for styles and table rows."""
    return sorted({setting(r) for r in ok(results)}, key=natural_key)


def slug(*parts: Any) -> str:
    s = "__".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def directions(results: Iterable[dict]) -> dict[str, bool]:
    """``higher_is_better`` as declared in the results (later files win), over the schema's defaults."""
    d = dict(HIGHER_IS_BETTER)
    for r in results:
        d.update(r.get("higher_is_better") or {})
    return d


# ------------------------------------------------------------------------------------------ statistics

def finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean, sample std (nan for fewer than two values) and count of the finite values."""
    v = finite(values)
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


# ------------------------------------------------------------------------------------- measurements

def operating_point(r: dict, prefix: str = "within_") -> dict | None:
    """The calibrated accuracy-drop operating point (``within_1pt`` by default), if recorded."""
    for op in r.get("operating_points") or []:
        if str(op.get("name", "")).startswith(prefix):
            return op
    return None


def op_value(r: dict, key: str, split: str = "test") -> float | None:
    """A metric of the within-drop operating point on ``split``; None when infeasible or missing."""
    op = operating_point(r)
    if not op or not op.get("feasible", True) or split not in op:
        return None
    return op[split].get(key)


def op_label(results: Iterable[dict]) -> str:
    for r in ok(results):
        op = operating_point(r)
        if op:
            # within_1pt, or within_1pt_per_exit for methods calibrated with one threshold per exit
            m = re.fullmatch(r"within_(.+?)pt(_per_exit)?", str(op["name"]))
            return f"within {m.group(1)} pt" if m else str(op["name"])
    return "within 1 pt"


def budget_accuracy(r: dict, budget: float) -> float | None:
    """Test accuracy at the most accurate threshold whose *calibration* strict MACs fit ``budget``
    (ties: the cheaper one); None when no threshold fits."""
    sw = r.get("sweep") or {}
    cal, test = sw.get("calibration") or {}, sw.get("test") or {}
    macs, acc, tacc = cal.get("rel_macs_strict") or [], cal.get("accuracy") or [], test.get("accuracy") or []
    best = None
    for i, (m, a) in enumerate(zip(macs, acc)):
        if m <= budget + 1e-9 and (best is None or (a, -m) > (acc[best], -macs[best])):
            best = i
    return None if best is None or best >= len(tacc) else tacc[best]


def latency(r: dict) -> dict[tuple[str, int], dict]:
    return {(x.get("variant"), x.get("batch_size")): x for x in r.get("latency") or []}


def batch_sizes(results: Iterable[dict]) -> list[int]:
    return sorted({x["batch_size"] for r in ok(results) for x in r.get("latency") or []
                   if x.get("variant") == "dynamic" and isinstance(x.get("batch_size"), int)})


def exit_names(r: dict) -> list[str]:
    return [str(e.get("name", f"exit {i + 1}")) for i, e in enumerate(r.get("exits") or [])]


def test_curve(r: dict, x_key: str = "rel_macs_strict", y_key: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
    """One seed's sweep on test, sorted by cost; repeated costs are averaged."""
    t = (r.get("sweep") or {}).get("test") or {}
    x, y = np.asarray(t.get(x_key) or [], float), np.asarray(t.get(y_key) or [], float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if not len(x):
        return x, y
    ux, inv = np.unique(x, return_inverse=True)
    return ux, np.bincount(inv, y) / np.bincount(inv)


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]], n: int = 200):
    """Seed curves interpolated on a common cost grid: (grid, mean, std). The grid spans the costs that
    every seed reaches (no extrapolation); std is zero for a single seed."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return None
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if hi <= lo:  # seeds with disjoint ranges: use the union, np.interp holds the end values
        lo, hi = min(c[0][0] for c in curves), max(c[0][-1] for c in curves)
    grid = np.linspace(lo, hi, n) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    std = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)
    return grid, ys.mean(0), std


# ---------------------------------------------------------------------------------------- risk control

def risk_rows(results: Iterable[dict]) -> list[dict]:
    """Every risk-control row of every ok cell, flattened with its cell's keys, delta and n_cal."""
    out = []
    for r in ok(results):
        rc = r.get("risk_control")
        if not isinstance(rc, dict):
            continue
        for row in rc.get("rows") or []:
            out.append({**row, "dataset": panel_key(r)[0], "backbone": panel_key(r)[1], "setting": setting(r),
                        "seed": seed(r), "delta": rc.get("delta"), "n_cal": rc.get("n_cal"),
                        "trials": rc.get("trials"), "score": rc.get("score")})
    return out


def ordered(values: Iterable[Any], order: tuple) -> list:
    vals = set(values)
    return [v for v in order if v in vals] + sorted(vals - set(order), key=natural_key)


def representative(values: Iterable[float], prefer: float) -> float:
    """``prefer`` when present, else the value closest to it."""
    vals = sorted(set(finite(values)))
    return min(vals, key=lambda v: (abs(v - prefer), v)) if vals else prefer


# ----------------------------------------------------------------------------------------- environment

def _device(env: dict) -> str:
    dev = str(env.get("device") or "?")
    name = env.get("gpu") or env.get("device_name") or env.get("cuda_device")
    if dev.startswith("cuda"):
        return f"{name or dev}"
    threads = env.get("threads")
    return f"{dev} ({env.get('cpu') or 'unknown CPU'}{f', {threads} threads' if threads else ''})"


def result_dates(results: Iterable[dict]) -> list[str]:
    """Dates the results were written (a timestamp in the result when there is one, else the file's)."""
    out = set()
    for r in results:
        stamp = r.get("finished") or r.get("timestamp") or r.get("date")
        if isinstance(stamp, str) and re.match(r"\d{4}-\d\d-\d\d", stamp):
            out.add(stamp[:10])
        elif r.get("_mtime"):
            out.add(datetime.fromtimestamp(r["_mtime"], timezone.utc).strftime("%Y-%m-%d"))
    return sorted(out)


def _join(values: Iterable[Any]) -> str:
    v = sorted({str(x) for x in values if x is not None}, key=natural_key)
    return " / ".join(v) if v else "?"


def env_note(results: Iterable[dict]) -> str:
    """One line: device, torch and timm versions, dates; mixed values are listed with ``/``."""
    rs = [r for r in results if r.get("env")]
    if not rs:
        return "environment not recorded"
    envs = [r["env"] for r in rs]
    pk = [e.get("packages") or {} for e in envs]
    dates = result_dates(rs)
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "?"
    return (f"{_join(_device(e) for e in envs)}; torch {_join(p.get('torch') for p in pk)}, "
            f"timm {_join(p.get('timm') for p in pk)}; results of {when}")
