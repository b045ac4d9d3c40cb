"""The main job's outputs from stored results: a CSV summary and the accuracy-versus-cost figure.

The runner calls :func:`write_summary` after every run; ``exitbench report`` writes the full report.
Reads result files only (no torch): any machine with pandas and matplotlib can redraw them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from exitbench.core.store import write_atomic
from exitbench.reports import figures, load


def summary_rows(results: list[load.CellResult]) -> list[dict]:
    """One flat row per (cell, operating point); a failed cell keeps one row with its error, a static
    baseline one row of its own."""
    rows: list[dict] = []
    for r in results:
        base = _cell_keys(r)
        if not r.ok:
            rows.append({**base, "error": r.error})
        elif r.static:
            rows.append({**base, **_static_values(r)})
        else:
            rows += [{**base, **_point_values(r, op)} for op in r.operating_points]
    return rows


def _cell_keys(r: load.CellResult) -> dict:
    """The columns that name a cell: its setting, seed, status and file name."""
    c = r.config
    return {"dataset": c.dataset, "backbone": c.backbone, "method": c.method,
            "setting": load.setting(r), "setting_id": load.result_setting_id(r), "seed": load.seed(r),
            "status": r.status, "cell": r.cell}


def _static_values(r: load.CellResult) -> dict:
    """A plain model: its accuracies, MACs, training time and its timing against each backbone it was next to."""
    row = {"operating_point": "static", "test_accuracy": r.backbone.test_accuracy,
           "calibration_accuracy": r.backbone.calibration_accuracy, "backbone_gmacs": r.backbone.macs / 1e9,
           "train_seconds": r.backbone.training.get("seconds")}
    for x in r.latency:
        row[f"latency_ratio_vs_{x.against}_b{x.batch_size}"] = x.latency_ratio
    return row


def _point_values(r: load.CellResult, op: load.OperatingPoint) -> dict:
    """One operating point: its choice, its metrics on both splits, and latency where it was timed or predicted."""
    row = {"operating_point": op.kind, "target": op.target, "score": op.score, "feasible": op.feasible,
           "headline": op.headline,
           "thresholds": None if op.thresholds is None else " ".join(f"{t:.6g}" for t in op.thresholds),
           "backbone_test_accuracy": r.backbone.test_accuracy, "backbone_gmacs": r.backbone.macs / 1e9}
    for split in ("calibration", "test"):
        m = getattr(op, split)
        for k in ("accuracy", "agreement", "rel_macs_strict", "rel_macs_paper"):
            row[f"{split}_{k}"] = None if m is None else getattr(m, k)
    row["test_exit_fractions"] = "" if op.test is None else " ".join(f"{f:.3f}" for f in op.test.exit_fractions)
    if op.timed:
        for x in r.latency:
            if x.latency_ratio is not None:
                row[f"latency_ratio_{x.variant}_b{x.batch_size}"] = x.latency_ratio
                row[f"realisation_{x.variant}_b{x.batch_size}"] = x.realisation
                row[f"noisy_{x.variant}_b{x.batch_size}"] = r.latency_noisy(x.batch_size, x.variant)
    for x in op.predicted_latency or []:
        row[f"predicted_latency_ratio_b{x.batch_size}"] = x.predicted_ratio
    row["train_seconds"] = r.training.get("seconds")
    return row


def write_csv(results: list[load.CellResult], path: Path) -> Path:
    """``summary.csv``: :func:`summary_rows` as a DataFrame (columns in order of first appearance), floats to
    five significant digits."""
    frame = pd.DataFrame(summary_rows(results))
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.5g"))


def accuracy_vs_macs(results: list[dict], path: Path) -> Path:
    """Test accuracy vs strict relative MACs: one panel per (dataset, backbone), one curve per method
    setting (mean ± std over seeds of its threshold sweep on test), the calibrated within-1-point
    operating point circled, and the backbone as a star at (1, its test accuracy). PNG only; the
    report also writes a PDF."""
    path = Path(path)
    fig = figures.accuracy_vs_macs(results)
    if fig is None:  # nothing ok yet: an empty figure that says so, so the file always exists
        with figures.style():
            fig = figures.plt.figure(figsize=(5, 1.2))
            fig.text(0.5, 0.5, "no successful cells to plot", ha="center", va="center")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    figures.plt.close(fig)
    return path


def write_summary(results_dir: str | Path) -> list[Path]:
    """Write ``summary.csv`` and ``accuracy_vs_macs.png`` into ``results_dir``."""
    d = Path(results_dir)
    try:  # the one loader: the latest run's cells, each with its unique setting label
        results = load.load_cells(d)
    except load.ReportError:
        results = []
    return [write_csv(results, d / "summary.csv"), accuracy_vs_macs(results, d / "accuracy_vs_macs.png")]
