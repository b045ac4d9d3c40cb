"""The main job's outputs from stored results: a CSV summary and the accuracy-versus-cost figure.

The runner calls :func:`write_summary` after every run; ``exitbench report`` writes the full report.
Reads result files only (no torch): any machine with pandas and matplotlib can redraw them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from exitbench.reports import figures, load
from exitbench.results import summary_rows

_EMPTY_SPLIT = {"accuracy": None, "agreement": None, "rel_macs_strict": None, "rel_macs_paper": None,
                "exit_fractions": []}


def _with_empty_splits(results: list[dict]) -> list[dict]:
    """Infeasible operating points carry no calibration/test numbers; give them empty ones so that the
    CSV keeps a row for them (with blanks) instead of failing."""
    out = []
    for r in results:
        ops = r.get("operating_points")
        if r.get("status") == "ok" and ops and any("test" not in op for op in ops):
            r = {**r, "operating_points": [op if "test" in op else {**op, "calibration": dict(_EMPTY_SPLIT),
                                                                      "test": dict(_EMPTY_SPLIT)} for op in ops]}
        out.append(r)
    return out


def write_csv(results: list[dict], path: Path) -> Path:
    """One row per (cell, operating point); failed cells keep a row with their error."""
    frame = pd.DataFrame(summary_rows(_with_empty_splits(results)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.5g")
    tmp.replace(path)
    return path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
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
