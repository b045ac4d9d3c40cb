"""Risk control across every cell: did each rule keep its promise, and what did it save?

The per-cell tables (:func:`exitbench.reports.tables.risk_table`) judge one method setting at a time; here
every cell's rows are pooled per (risk, rule, eps): in how many cells the rule broke its guarantee by the
same criterion (:func:`exitbench.reports.tables.violates`), the mean and worst violation frequency
P(risk > eps) against delta, and the mean strict MACs of the chosen thresholds. Pareto testing is then
set against the rule it claims to improve on, cell by cell: the relative change of its MACs.
"""

from __future__ import annotations

import math

import pandas as pd

from exitbench.reports import load
from exitbench.reports.tables import DASH, Cell, Table, violates

KEYS = ["dataset", "backbone", "setting", "seed", "risk", "rule", "eps", "delta"]


def frame(results: list[load.CellResult]) -> pd.DataFrame:
    """Every risk-control row of every ok cell, one row each, with whether it broke its guarantee."""
    df = pd.DataFrame(load.risk_rows(results))
    if df.empty:
        return df
    df["broken"] = [violates(row, row["eps"], row["delta"]) for row in df.to_dict("records")]
    return df


def risk_summary_table(results: list[load.CellResult]) -> Table | None:
    """Per (risk, rule, eps): cells, cells where the guarantee broke, mean and worst P(risk > eps), mean
    strict MACs (± std over cells)."""
    df = frame(results)
    if df.empty:
        return None
    g = df.groupby(["risk", "rule", "eps", "delta"], sort=False)
    agg = g.agg(cells=("violation_freq", "size"), broken=("broken", "sum"), viol_mean=("violation_freq", "mean"),
                viol_max=("violation_freq", "max"), macs_mean=("rel_macs_strict_mean", "mean"),
                macs_std=("rel_macs_strict_mean", "std"), promise=("promise", "first")).reset_index()
    cols = ["risk", "rule", "ε", "cells", "broke", "P(risk > ε) mean", "worst", "rel. MACs ↓"]
    rows, starts = [], []
    for risk, part in agg.groupby("risk", sort=False):
        starts.append(len(rows))
        for i, x in enumerate(part.itertuples()):
            macs = DASH if math.isnan(x.macs_mean) else (
                f"{x.macs_mean:.3f}" + ("" if math.isnan(x.macs_std) else f" ± {x.macs_std:.3f}"))
            promised = x.promise != "none"
            rows.append([Cell(risk if i == 0 else ""), Cell(x.rule), Cell(f"{x.eps:g}"), Cell(str(x.cells)),
                         Cell(f"{x.broken}" if promised else DASH, bold=promised and x.broken > 0),
                         Cell(f"{x.viol_mean:.2f}"), Cell(f"{x.viol_max:.2f}"), Cell(macs)])
    deltas = sorted(set(agg["delta"]))
    notes = [f"Over {df.groupby(KEYS[:4]).ngroups} cells (every method setting and seed); δ = "
             f"{', '.join(f'{d:g}' for d in deltas)}. broke: cells where the rule broke its own promise beyond trial "
             "noise (UCB/LTT: P(risk > ε) > δ + two binomial standard errors; CRC: mean risk > ε by two standard "
             f"errors); {DASH}: the rule promises nothing (naive, crc-raw). P(risk > ε): the share of calibration "
             "draws whose choice had population risk above ε, mean and worst over cells. rel. MACs: strict, "
             "relative to the backbone, mean ± std over cells."]
    return Table("risk_summary", "Risk control over every cell", cols, rows, "llrrrrrr", starts, notes)


def versus(results: list[load.CellResult], rule: str = "pareto-testing", against: str = "ucb-wsr",
           better: float = 0.10) -> dict | None:
    """Per (cell, risk, eps) where both rules chose: ``rule``'s strict MACs relative to ``against``'s. Returns
    the count, the median change, the share at least ``better`` cheaper and the share more expensive."""
    df = frame(results)
    if df.empty or not {rule, against} <= set(df["rule"]):
        return None
    wide = df.pivot_table(index=[k for k in KEYS if k != "rule"], columns="rule", values="rel_macs_strict_mean")
    both = wide[[rule, against]].dropna()
    if both.empty:
        return None
    change = both[rule] / both[against] - 1
    return {"rule": rule, "against": against, "cases": int(len(change)), "median": float(change.median()),
            "cheaper": int((change <= -better).sum()), "costlier": int((change > 1e-9).sum()), "better": better,
            "min": float(change.min()), "max": float(change.max())}


def versus_text(v: dict) -> str:
    """One sentence for the report."""
    return (f"{v['rule']} against {v['against']}, cell by cell over {v['cases']} (cell, risk, ε) cases: median "
            f"change in strict MACs {100 * v['median']:+.1f} % (from {100 * v['min']:+.1f} % to {100 * v['max']:+.1f} "
            f"%); at least {100 * v['better']:g} % cheaper in {v['cheaper']}, more expensive in {v['costlier']}.")
