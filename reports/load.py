"""The one loader of stored results, and the accessors tables and figures read them with.

Results are read only through the typed contract (``exitbench.core.results.CellResult``); nothing here
imports torch or re-decides a threshold: every operating point (accuracy drop, MACs budgets, patience,
MSDNet budgets) was chosen on calibration by the runner and is only looked up by its ``kind`` and
``target``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exitbench.core.errors import UserError
from exitbench.core.results import (
    HIGHER_IS_BETTER,
    CellResult,
    LatencyRecord,
    OperatingPoint,
    result_setting_id,  # noqa: F401  (re-exported for reports.compare)
)
from exitbench.core.store import latest_run, read_json, read_manifest
from exitbench.reports.labels import label_key, point_label, setting_label, setting_labels


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


def load_cells(results_dir: str | Path, all_cells: bool = False) -> list[CellResult]:
    """Every readable cell result of the latest run under ``results_dir/cells`` (or ``results_dir``
    itself), each with ``path``, ``mtime`` and a unique short ``label`` filled in.
    Cells the directory's manifest does not list are left out, and named on stderr, unless
    ``all_cells``. Unreadable files are skipped with a warning on stderr."""
    paths, others = latest_run(results_dir, result_files(results_dir))
    if others and not all_cells:
        names = ", ".join(p.stem for p in others[:3]) + (", ..." if len(others) > 3 else "")
        print(f"exitbench: note: {len(others)} cells in {results_dir} are not part of the latest run ({names}); "
              "--all includes them", file=sys.stderr)
    out: list[CellResult] = []
    for p in paths + (others if all_cells else []):
        try:
            d = read_json(p)
        except (OSError, ValueError) as e:
            print(f"exitbench: warning: skipping unreadable result {p}: {e}", file=sys.stderr)
            continue
        if not isinstance(d, dict) or "status" not in d:
            print(f"exitbench: warning: skipping {p}: not a cell result", file=sys.stderr)
            continue
        r = CellResult.from_dict(d, p)  # another schema version: a one-line UserError
        r.path, r.mtime = str(p), p.stat().st_mtime
        out.append(r)
    if not out:
        raise ReportError(f"{results_dir}: no readable cell results")
    labels = setting_labels(out)
    for r in out:
        r.label = labels.get(label_key(r)) or setting(r)
    return out


def missing_cells(results_dir: str | Path, loaded: list[CellResult]) -> tuple[int, list[str]]:
    """(how many cells the latest run listed, those of them without a readable result): what a report made
    while a run is under way, or after some cells failed to write, does not show. (0, []) without a manifest."""
    m = read_manifest(results_dir)
    if m is None:
        return 0, []
    have = {Path(r.path).stem for r in loaded if r.path}
    return len(m["cells"]), [c for c in m["cells"] if c not in have]


# ---------------------------------------------------------------------------------------------- keys

def sortable(v: Any) -> tuple:
    """A sort key for a typed value: numbers by value (2 before 10), then everything else as text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    if isinstance(v, (list, tuple)):
        return (1, 0.0, "", *[sortable(x) for x in v])
    return (2, 0.0, str(v))


def order_key(key: Any) -> tuple:
    """Sort key for a tuple of typed values (a group key)."""
    return tuple(sortable(k) for k in key) if isinstance(key, tuple) else (sortable(key),)


def panel_key(r: CellResult) -> tuple[str, str]:
    return (r.config.dataset, r.config.backbone)


def setting(r: CellResult) -> str:
    """The short label of a result's method setting (unique per setting_id among the loaded results)."""
    return r.label or setting_label(r.config)


def setting_order(r: CellResult) -> tuple:
    """Where a setting sorts: by method, then by the typed values of its swept hyper-parameters."""
    c = r.config
    return (c.method, tuple(sortable(c.hparams.get(k)) for k in c.swept), setting(r))


def setting_key(r: CellResult) -> tuple[str, str, str]:
    return (*panel_key(r), setting(r))


def seed(r: CellResult) -> int:
    return r.config.seed


def ok(results: Iterable[CellResult]) -> list[CellResult]:
    """The early-exit cells that finished (the finished static baselines: :func:`baselines`)."""
    return [r for r in results if r.ok and not r.static]


def finished(results: Iterable[CellResult]) -> list[CellResult]:
    """Every cell that finished: the early-exit cells (:func:`ok`) and the static baselines (:func:`baselines`)."""
    return [r for r in results if r.ok]


def baselines(results: Iterable[CellResult]) -> list[CellResult]:
    """The static baselines that finished (plain models from a matrix's ``baselines``)."""
    return [r for r in results if r.ok and r.static]


@dataclasses.dataclass
class StaticPoint:
    """A static baseline on one (dataset, backbone) panel, over its seeds: its accuracy and MACs relative
    to the panel's backbone, and its latency ratios measured side by side with that backbone."""

    model: str
    accuracies: list[float]  # test accuracy per seed
    rel_macs: float  # its MACs / the panel backbone's (a static model has one cost: strict = paper)
    latency: dict[int, list[LatencyRecord]]  # batch size -> its records against the panel backbone, per seed
    train_seconds: list[float]

    @property
    def label(self) -> str:
        return f"{self.model} (static)"


def static_points(statics: Iterable[CellResult], dataset: str, backbone: str, backbone_macs: int | None
                  ) -> list[StaticPoint]:
    """The static baselines next to ``backbone`` on ``dataset``, cheapest first."""
    by_model: dict[str, list[CellResult]] = defaultdict(list)
    for r in statics:
        c = r.config
        if c.dataset == dataset and any(n == backbone for n, _ in c.next_to):
            by_model[c.backbone].append(r)
    out = []
    for model, rs in by_model.items():
        lat: dict[int, list[LatencyRecord]] = defaultdict(list)
        for r in rs:
            for x in r.latency:
                if x.variant == "static" and x.against == backbone:
                    lat[x.batch_size].append(x)
        macs = rs[0].backbone.macs
        out.append(StaticPoint(model, [r.backbone.test_accuracy for r in rs],
                               macs / backbone_macs if backbone_macs else math.nan, dict(lat),
                               finite(r.backbone.training.get("seconds") for r in rs)))
    return sorted(out, key=lambda p: (p.rel_macs, p.model))


def panel_macs(cells: Iterable[CellResult]) -> int | None:
    """The backbone MACs of a panel's early-exit cells (one backbone per panel)."""
    return next((r.backbone.macs for r in cells if r.backbone is not None), None)


def group(results: Iterable[CellResult], key) -> dict:
    """``key(r)`` groups, ordered by panel and then by setting (typed hyper-parameter values, never a
    label read back); members sorted by seed."""
    g: dict = defaultdict(list)
    for r in results:
        g[key(r)].append(r)
    if not all(isinstance(r, CellResult) for rs in g.values() for r in rs):  # derived rows: by their key
        return {k: g[k] for k in sorted(g, key=order_key)}
    first = {k: min((*panel_key(r), *setting_order(r)) for r in rs) for k, rs in g.items()}
    return {k: sorted(g[k], key=lambda r: sortable(seed(r))) for k in sorted(g, key=lambda k: first[k])}


def by_setting(results: Iterable[CellResult]) -> dict[tuple[str, str, str], list[CellResult]]:
    return group(ok(results), setting_key)


def settings(results: Iterable[CellResult]) -> list[str]:
    """Every method setting label, in the order used for styles and table rows."""
    order: dict[str, tuple] = {}
    for r in ok(results):
        order[setting(r)] = min(order.get(setting(r), setting_order(r)), setting_order(r))
    return sorted(order, key=lambda s: order[s])


def slug(*parts: Any) -> str:
    s = "__".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def directions(results: Iterable[CellResult]) -> dict[str, bool]:
    """``higher_is_better`` as declared in the results (later files win), over the schema's defaults."""
    d = dict(HIGHER_IS_BETTER)
    for r in results:
        d.update(r.higher_is_better or {})
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
    v = pd.Series(finite(values), dtype=float)
    return float(v.mean()), float(v.std()), int(v.count())


SETTING = ["dataset", "backbone", "setting"]  # the columns that name one method setting in a seed frame


def seed_frame(results: Iterable[CellResult], values: dict[str, Callable[[CellResult], Any]]) -> pd.DataFrame:
    """One row per result: ``dataset``, ``backbone``, ``setting``, ``seed`` and each of ``values`` read from
    it, in the order of :func:`group` (by panel, then by setting, members by seed), so that a ``groupby``
    with ``sort=False`` lists panels and settings in table order."""
    # sorted is stable: two results with the same keys (a seed run twice, --all) keep their input order
    rs = sorted(results, key=lambda r: (*panel_key(r), *setting_order(r), sortable(seed(r))))
    return pd.DataFrame([{"dataset": panel_key(r)[0], "backbone": panel_key(r)[1], "setting": setting(r),
                          "seed": seed(r), **{k: get(r) for k, get in values.items()}} for r in rs],
                        columns=[*SETTING, "seed", *values])


def seed_stats(frame: pd.DataFrame, by: list[str], columns: Iterable[str], **extra: tuple[str, Any]) -> pd.DataFrame:
    """Per group of ``by`` (in the frame's order): ``seeds`` (its rows), and for each of ``columns`` the mean
    (``C.mean``), sample std (``C.std``, NaN for fewer than two values) and count (``C.n``) of its finite
    values; ``extra`` are further named aggregations (``name=(column, function)``)."""
    columns = list(columns)
    values = frame.copy()
    values[columns] = frame[columns].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    # Series.mean / Series.std per group sum like NumPy (mean_std); groupby's own "mean" and "std" (Kahan,
    # Welford) can differ in the last bit and so flip a rounded digit in a table
    stats = {f"{c}.{name}": (c, f) for c in columns for name, f in (("mean", pd.Series.mean),
                                                                     ("std", pd.Series.std), ("n", "count"))}
    return values.groupby(by, sort=False, dropna=False).agg(seeds=("seed", "size"), **stats, **extra)


SEED_K = 2.0  # the seed rule's factor (exitbench compare --k, the report's significance table)


def seed_significant(a: tuple[float, float, int], b: tuple[float, float, int], k: float = SEED_K) -> bool | None:
    """The seed rule, one for every comparison exitbench makes: two (mean, std, n) summaries differ
    significantly when ``|mean_b - mean_a| > k * sqrt((std_a² + std_b²) / 2)`` (the pooled seed standard
    deviation); None (undecided) with fewer than two seeds on either side."""
    if a[2] < 2 or b[2] < 2:
        return None
    return abs(b[0] - a[0]) > k * math.sqrt((a[1] ** 2 + b[1] ** 2) / 2)


# ------------------------------------------------------------------------------------- measurements

def operating_point(r: CellResult) -> OperatingPoint | None:
    """The headline operating point (the method's calibrated accuracy-drop point), if recorded."""
    return r.headline()


def op_value(r: CellResult, key: str, split: str = "test") -> Any:
    """A metric of the headline operating point on ``split``; None when infeasible or missing."""
    op = operating_point(r)
    metrics = getattr(op, split, None) if op is not None and op.feasible else None
    return None if metrics is None else getattr(metrics, key)


def op_label(results: Iterable[CellResult]) -> str:
    """The headline point's label (e.g. ``within 1 pt``), from its typed kind and target."""
    for r in ok(results):
        op = operating_point(r)
        if op is not None:
            return point_label(op).removesuffix(", per exit")
    return "within 1 pt"


def op_drop_label(results: Iterable[CellResult]) -> str:
    """The headline point's accuracy drop as text (``1 pt``), from its typed target."""
    for r in ok(results):
        op = operating_point(r)
        if op is not None and op.target is not None:
            return f"{op.target * 100:g} pt"
    return "1 pt"


def budget_accuracy(r: CellResult, budget: float, kind: str = "macs_budget") -> float | None:
    """Test accuracy at the cell's budget point of ``kind`` (``macs_budget`` or ``msdnet_budget``) for
    ``budget``, chosen on calibration by the runner; None when nothing fits the budget or the point was
    not recorded."""
    op = r.point(kind, budget)
    return op.test.accuracy if op is not None and op.feasible and op.test is not None else None


def budgets(results: Iterable[CellResult], kind: str = "macs_budget") -> list[float]:
    """Every budget that some ok cell has a point of ``kind`` for, ascending."""
    return sorted({p.target for r in ok(results) for p in r.operating_points
                   if p.kind == kind and p.target is not None})


HEADLINE_VARIANT = "compaction"  # real per-sample exit: the variant the summary table and latency figure show
IDEAL_VARIANT = "per-stage-ideal"  # drawn as a reference line, not as a bar


def devices(results: Iterable[CellResult]) -> list[str]:
    """Every device latency was timed on: the devices the cells ran on first, then those added by
    ``exitbench time``."""
    rs = ok(results)
    timed = ordered(x.device for r in rs for x in r.latency)
    ran = [d for d in ordered((r.env or {}).get("device") for r in rs) if d in timed]
    return ran + [d for d in timed if d not in ran]


def on_device(results: Iterable[CellResult], device: str) -> list[CellResult]:
    """The results with only the latency records timed on ``device`` (a view for one latency panel)."""
    return [dataclasses.replace(r, latency=[x for x in r.latency if x.device == device]) for r in results]


def latency(r: CellResult) -> dict[tuple[str, int], LatencyRecord]:
    return {(x.variant, x.batch_size): x for x in r.latency}


def latency_value(r: CellResult, variant: str, batch_size: int, key: str) -> Any:
    x = r.latency_record(variant, batch_size)
    return None if x is None else getattr(x, key)


def latency_noisy(r: CellResult, batch_size: int, variant: str = HEADLINE_VARIANT) -> bool:
    return r.latency_noisy(batch_size, variant)


def batch_sizes(results: Iterable[CellResult]) -> list[int]:
    """Batch sizes at which some variant was timed against the backbone."""
    return sorted({x.batch_size for r in ok(results) for x in r.latency if x.latency_ratio is not None})


def exit_names(r: CellResult) -> list[str]:
    return [e.name for e in r.exits]


def test_curve(r: CellResult, x_key: str = "rel_macs_strict", y_key: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
    """One seed's sweep on test, sorted by cost; repeated costs are averaged."""
    t = r.sweep.test if r.sweep is not None else {}
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

def risk_rows(results: Iterable[CellResult]) -> list[dict]:
    """Every risk-control row of every ok cell as one flat record (a derived table, in the stored
    order), with its cell's keys, delta, n_cal, trials and score."""
    out = []
    for r in ok(results):
        rc = r.risk_control
        if rc is None:
            continue
        for row in rc.rows:
            out.append({**asdict(row), "dataset": panel_key(r)[0], "backbone": panel_key(r)[1],
                        "setting": setting(r), "seed": seed(r), "delta": rc.delta, "n_cal": rc.n_cal,
                        "trials": rc.trials, "score": rc.score})
    return out


def ordered(values: Iterable[Any]) -> list:
    """Distinct values in order of first appearance: risks and rules are stored in registry order."""
    return list(dict.fromkeys(v for v in values if v is not None))


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


def result_dates(results: Iterable[CellResult]) -> list[str]:
    """Dates the results were written (the result's ``finished`` stamp when there is one, else the file's)."""
    out = set()
    for r in results:
        if r.finished:
            out.add(r.finished[:10])
        elif r.mtime:
            out.add(datetime.fromtimestamp(r.mtime, timezone.utc).strftime("%Y-%m-%d"))
    return sorted(out)


def _join(values: Iterable[Any]) -> str:
    v = sorted({str(x) for x in values if x is not None})
    return " / ".join(v) if v else "?"


def env_note(results: Iterable[CellResult]) -> str:
    """One line: device, torch and timm versions, dates; mixed values are listed with ``/``."""
    rs = [r for r in results if r.env]
    if not rs:
        return "environment not recorded"
    envs = [r.env for r in rs]
    pk = [e.get("packages") or {} for e in envs]
    dates = result_dates(rs)
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "?"
    return (f"{_join(_device(e) for e in envs)}; torch {_join(p.get('torch') for p in pk)}, "
            f"timm {_join(p.get('timm') for p in pk)}; results of {when}")
