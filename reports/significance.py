"""Which differences between methods are significant, per (dataset, backbone).

Columns: the test accuracy at each MACs budget (the runner's calibrated ``macs_budget`` points) and the
strict MACs of the headline (within-drop) point. In each column, every method setting and static baseline
is compared with the column's best by the seed rule (:func:`exitbench.reports.load.seed_significant`, the
rule ``exitbench compare`` uses): significant when the difference of the seed means exceeds twice the
pooled seed standard deviation, which needs two or more seeds on both sides. Every seed is tested on the
same test split, so the rule measures what training and calibration vary, not test-set sampling (whose
95 % interval, about 2 sqrt(p(1-p)/n), the table states).
"""

from __future__ import annotations

import math

import pandas as pd

from exitbench.reports import load
from exitbench.reports.tables import DASH, Cell, Table


def _values(results: list[load.CellResult]) -> pd.DataFrame:
    """One row per (panel, setting, seed, column): the value of that column, when the cell has it."""
    rows = []
    for r in load.ok(results):
        ds, bb = load.panel_key(r)
        for b in load.budgets([r]):
            rows.append((ds, bb, load.setting(r), load.seed(r), f"{100 * b:g} % MACs", load.budget_accuracy(r, b)))
        rows.append((ds, bb, load.setting(r), load.seed(r), "headline MACs", load.op_value(r, "rel_macs_strict")))
    for r in load.baselines(results):
        for ds, bb in {(r.config.dataset, n) for n, _ in r.config.next_to}:
            cells = [x for x in load.ok(results) if load.panel_key(x) == (ds, bb)]
            for sp in load.static_points([r], ds, bb, load.panel_macs(cells)):
                for b in load.budgets(cells):
                    if sp.rel_macs <= b + 1e-9:
                        rows.append((ds, bb, sp.label, load.seed(r), f"{100 * b:g} % MACs", sp.accuracies[0]))
    df = pd.DataFrame(rows, columns=["dataset", "backbone", "setting", "seed", "column", "value"])
    return df.dropna(subset=["value"])


def significance_table(results: list[load.CellResult], k: float = load.SEED_K) -> Table | None:
    """Per panel and column: the best setting (its mean) and every other setting's difference to it, marked
    significant or not by the seed rule."""
    df = _values(results)
    if df.empty:
        return None
    columns = list(dict.fromkeys(c for c in df["column"] if c != "headline MACs")) + ["headline MACs"]
    stats = (df.groupby(["dataset", "backbone", "column", "setting"], sort=False)["value"]
             .agg(["mean", "std", "count"]).reset_index())
    rows, starts = [], []
    for (ds, bb), panel in stats.groupby(["dataset", "backbone"], sort=False):
        starts.append(len(rows))
        order = {s: i for i, s in enumerate(load.settings(results))}  # method order; static baselines last
        settings = sorted(dict.fromkeys(panel["setting"]), key=lambda s: order.get(s, len(order)))
        verdicts = {s: [] for s in settings}
        for col in columns:
            part = panel[panel["column"] == col].set_index("setting")
            higher = col != "headline MACs"
            if part.empty:
                for s in settings:
                    verdicts[s].append(DASH)
                continue
            best = part["mean"].idxmax() if higher else part["mean"].idxmin()
            b = tuple(part.loc[best, ["mean", "std", "count"]])
            for s in settings:
                if s not in part.index:
                    verdicts[s].append(DASH)
                    continue
                scale = 100 if higher else 1
                if s == best:
                    verdicts[s].append(f"best ({scale * b[0]:.{1 if higher else 3}f})")
                    continue
                a = tuple(part.loc[s, ["mean", "std", "count"]])
                sig = load.seed_significant(b, (a[0], 0.0 if math.isnan(a[1]) else a[1], int(a[2])), k)
                word = "1 seed" if sig is None else "sig." if sig else "n.s."
                verdicts[s].append(f"{scale * (a[0] - b[0]):+.{1 if higher else 3}f} {word}")
        for i, s in enumerate(settings):
            rows.append([Cell(ds if i == 0 else ""), Cell(bb if i == 0 else ""), Cell(s),
                         *[Cell(v, bold=v.startswith("best")) for v in verdicts[s]]])
    n_test = max((r.data or {}).get("test", 0) for r in load.finished(results))
    p = 0.9
    half = 200 * math.sqrt(p * (1 - p) / n_test) if n_test else math.nan
    notes = [f"Each column's best (bold: its mean over seeds) and every other setting's difference to it: test "
             "accuracy points at a MACs budget (higher is better), strict relative MACs at the headline point "
             "(lower is better). sig.: the difference exceeds "
             f"{k:g} × the pooled seed std, sqrt((s_best² + s²) / 2) (the seed rule of `exitbench compare`); n.s.: "
             f"it does not; 1 seed: no spread to judge by; {DASH}: no point (infeasible, or a static model above "
             "the budget).",
             f"Every seed is scored on the same {n_test} test images: the seed rule measures training and "
             f"calibration variation; test-set sampling adds about ±{half:.1f} points (95 %, at 90 % accuracy) "
             "to any single accuracy."]
    return Table("significance", "Differences between methods and their significance", ["dataset", "backbone",
                 "method", *columns], rows, "lll" + "r" * len(columns), starts, notes)
