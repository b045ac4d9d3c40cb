"""Tables from stored results, rendered to Markdown, LaTeX (booktabs) and HTML.

A table is built once (:class:`Table`: cells with their text and bold flag, groups, notes) and each
renderer only formats it, so the three outputs always show the same numbers. Values are mean ± std over
seeds (sample std; a single seed shows the mean alone). "Best" is decided on the displayed (rounded)
means, so equal-looking numbers are bold together.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from exitbench.reports import load

DASH = "—"


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    name: str  # file stem, LaTeX label
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    align: str  # one of l/r per column
    group_starts: list[int] = field(default_factory=list)  # rows that open a group (a rule above them)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- formatting

def fmt_stats(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
    """``"96.7 ± 0.4"`` (or ``"96.7"`` for one value, ``"—"`` for none) and the rounded mean, from a mean,
    a sample std and a count."""
    if n == 0:
        return DASH, math.nan
    m, s = mean * scale, std * scale
    text = f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text, round(m, digits)


def fmt_pm(values: Iterable, scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
    """:func:`fmt_stats` of the finite ``values``."""
    return fmt_stats(*load.mean_std(values), scale, digits)


def _pm(stats: pd.Series, column: str, scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
    """:func:`fmt_stats` of ``column`` in a row of :func:`load.seed_stats`."""
    return fmt_stats(stats[f"{column}.mean"], stats[f"{column}.std"], int(stats[f"{column}.n"]), scale, digits)


def _bold_best(rows: list[list[Cell]], means: list[list[float]], columns: dict[int, bool]) -> None:
    """Bold the best mean per column (``columns``: index -> higher is better) among ``rows``."""
    for j, higher in columns.items():
        vals = [m[j] for m in means if not math.isnan(m[j])]
        if len(vals) < 2:
            continue
        best = max(vals) if higher else min(vals)
        for row, m in zip(rows, means):
            if not math.isnan(m[j]) and m[j] == best:
                row[j].bold = True


def _group_cells(ds: str, bb: str, first: bool) -> list[Cell]:
    return [Cell(ds if first else ""), Cell(bb if first else "")]


# ------------------------------------------------------------------------------------ per-seed frames

PANEL = ["dataset", "backbone"]
BACKBONE = {"backbone_accuracy": lambda r: r.backbone.test_accuracy,
            "backbone_seconds": lambda r: r.backbone.training.get("seconds"),
            "backbone_macs": lambda r: r.backbone.macs}


def _backbone_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Per panel, the backbone's values over its seeds (``seeds``: how many). The backbone is shared by every
    method setting of a seed, so each seed counts once, with its first row (in table order)."""
    per_seed = frame.drop_duplicates([*PANEL, "seed"], keep="first")
    return load.seed_stats(per_seed, PANEL, ["backbone_accuracy", "backbone_seconds"],
                           backbone_macs=("backbone_macs", "first"))


def _panels(settings: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(dataset, backbone, its settings' rows indexed by label) per panel of a per-setting frame, in order."""
    for (ds, bb), block in settings.groupby(level=[0, 1], sort=False):
        yield ds, bb, block.droplevel([0, 1])


def _some_seeds(k: pd.Series, seeds: pd.Series) -> bool:
    """Whether some setting has a value in some but not all of its seeds (a (k/n) mark in the table)."""
    return bool(((k > 0) & (k < seeds)).any())


def _macs(stats: pd.Series) -> int | None:
    """The panel backbone's MACs from :func:`_backbone_stats` (a float column there) as the int it was stored as."""
    m = stats["backbone_macs"]
    return None if pd.isna(m) else int(m)


# -------------------------------------------------------------------------------------------- tables

BUDGET_KINDS = {  # kind -> (file stem, title, how the point was chosen)
    "macs_budget": ("budget", "Accuracy at a MACs budget",
                    "the most accurate shared threshold whose calibration cost (strict MACs, relative to the "
                    "backbone) fits the budget"),
    "msdnet_budget": ("budget_msdnet", "Accuracy at a MACs budget, MSDNet's geometric exit shares",
                      "MSDNet's budgeted thresholds (exit k takes a share of the samples proportional to p^k) for "
                      "the most accurate p whose calibration cost (strict MACs) fits the budget"),
}


def budget_table(results: list[load.CellResult], budgets: tuple[float, ...] | None = None,
                 kind: str = "macs_budget") -> Table:
    """Test accuracy (%) of each method at fractions of the backbone's MACs, read from the cells' budget
    points of ``kind`` (``BUDGET_KINDS``; chosen on calibration by the runner, never here). ``budgets``
    default to every budget the results have."""
    budgets = tuple(load.budgets(results, kind)) if budgets is None else budgets
    stem, title, how = BUDGET_KINDS[kind]
    cols = ["dataset", "backbone", "method", "seeds", *[f"{100 * b:g} % MACs" for b in budgets]]
    at = {f"at {i}": (lambda r, b=b: load.budget_accuracy(r, b, kind)) for i, b in enumerate(budgets)}
    frame = load.seed_frame(load.ok(results), {**BACKBONE, **at})
    backbone, settings = _backbone_stats(frame), load.seed_stats(frame, load.SETTING, at)
    statics = load.baselines(results)
    rows, starts, any_static = [], [], False
    for ds, bb, block in _panels(settings):
        starts.append(len(rows))
        ref = backbone.loc[(ds, bb)]
        base_txt, _ = _pm(ref, "backbone_accuracy", 100)
        rows.append([*_group_cells(ds, bb, True), Cell("backbone (reference)"), Cell(str(int(ref["seeds"]))),
                     *[Cell(base_txt if b >= 1.0 else DASH) for b in budgets]])
        cells, means = [], []
        for label, st in block.iterrows():
            texts, seeds = [_pm(st, c, 100) for c in at], int(st["seeds"])
            met = [int(st[f"{c}.n"]) for c in at]
            cells.append([*_group_cells(ds, bb, False), Cell(label), Cell(str(seeds)),
                          *[Cell(t + (f" ({k}/{seeds})" if 0 < k < seeds else "")) for (t, _), k in zip(texts, met)]])
            means.append([math.nan] * 4 + [m for _, m in texts])
        for sp in load.static_points(statics, ds, bb, _macs(ref)):
            row, mrow = _budget_static_row(ds, bb, sp, budgets)
            cells.append(row)
            means.append(mrow)
            any_static = True
        _bold_best(cells, means, {4 + i: True for i in range(len(budgets))})
        rows += cells
    partial = any(_some_seeds(settings[f"{c}.n"], settings["seeds"]) for c in at)
    return Table(stem, title, cols, rows, "lllr" + "r" * len(budgets), starts,
                 _budget_notes(how, any_static, partial))


def _budget_static_row(ds: str, bb: str, sp: load.StaticPoint, budgets: tuple[float, ...]
                       ) -> tuple[list[Cell], list[float]]:
    """A static baseline's row of the budget table and its means: its accuracy under every budget it fits."""
    text, m = fmt_pm(sp.accuracies, 100)
    fits = [sp.rel_macs <= b + 1e-9 for b in budgets]
    row = [*_group_cells(ds, bb, False), Cell(f"{sp.label}, {sp.rel_macs:.2f}× MACs"), Cell(str(len(sp.accuracies))),
           *[Cell(text if f else DASH) for f in fits]]
    return row, [math.nan] * 4 + [m if f else math.nan for f in fits]


def _budget_notes(how: str, any_static: bool, partial: bool) -> list[str]:
    notes = [f"Test accuracy (%) at {how}; mean ± std over seeds; best method per column in bold.",
             f"{DASH}: no threshold meets the budget on calibration (infeasible)."]
    if any_static:
        notes.append("(static): a plain model trained with the backbone's recipe, no exits; its accuracy appears "
                     f"under every budget its own MACs fit, {DASH} under those they exceed; it is bold when best.")
    if partial:
        notes.append("(k/n): the budget is met in k of n seeds; the mean is over those k.")
    return notes


@dataclass
class _Column:
    """A summary-table column over seeds: what to read from one cell, how to show it, which way is better."""

    key: str
    get: Callable[[load.CellResult], float | None]
    scale: float
    digits: int
    higher: bool


def _summary_columns(hib: dict[str, bool], bss: list[int]) -> tuple[list[str], list[_Column]]:
    """The summary table's headers (with their directions) and its per-seed columns after ``seeds``."""
    def arrow(key: str) -> str:
        return " ↑" if hib.get(key, True) else " ↓"

    heads = ["dataset", "backbone", "method", "seeds", "acc. (%)" + arrow("accuracy"),
             "agree. (%)" + arrow("agreement"), "MACs strict" + arrow("rel_macs_strict"),
             "MACs paper" + arrow("rel_macs_paper"), *[f"time b={b}" + arrow("latency_ratio") for b in bss],
             "train (s) ↓"]
    point = [_Column(k, lambda r, k=k: load.op_value(r, k), scale, digits, hib.get(k, higher))
             for k, scale, digits, higher in (("accuracy", 100, 1, True), ("agreement", 100, 1, True),
                                              ("rel_macs_strict", 1, 3, False), ("rel_macs_paper", 1, 3, False))]
    times = [_Column(f"time {b}", lambda r, b=b: load.latency_value(r, load.HEADLINE_VARIANT, b, "latency_ratio")
                     if _op_feasible(r) else None, 1, 2, hib.get("latency_ratio", False)) for b in bss]
    return heads, [*point, *times, _Column("train", lambda r: r.training.get("seconds"), 1, 1, False)]


def summary_table(results: list[load.CellResult]) -> Table:
    """Per method setting at the calibrated within-drop operating point: accuracy, agreement, relative
    MACs (both accountings, separate columns), measured time ratio per batch size, training time."""
    bss = load.batch_sizes(results)
    oplabel = load.op_label(results)
    heads, columns = _summary_columns(load.directions(results), bss)
    noisy = {f"noisy {b}": (lambda r, b=b: _op_feasible(r) and load.latency_noisy(r, b)) for b in bss}
    frame = load.seed_frame(load.ok(results), {**BACKBONE, **{c.key: c.get for c in columns},
                                               "feasible": _op_feasible, **noisy})
    backbone = _backbone_stats(frame)
    settings = load.seed_stats(frame, load.SETTING, [c.key for c in columns], feasible=("feasible", "sum"),
                               **{k: (k, "any") for k in noisy})
    statics = load.baselines(results)
    rows, starts, any_noisy, any_static = [], [], settings[list(noisy)].any().any(), False
    for ds, bb, block in _panels(settings):
        starts.append(len(rows))
        ref = backbone.loc[(ds, bb)]
        rows.append(_summary_reference_row(ds, bb, ref, bss))
        cells, means = [], []
        for label, st in block.iterrows():
            row, mrow = _summary_setting_row(ds, bb, label, st, columns, bss)
            cells.append(row)
            means.append(mrow)
        for sp in load.static_points(statics, ds, bb, _macs(ref)):
            row, mrow = _summary_static_row(ds, bb, sp, bss)
            cells.append(row)
            means.append(mrow)
            any_static, any_noisy = True, any_noisy or any(c.text.endswith(" *") for c in row)
        _bold_best(cells, means, {4 + k: c.higher for k, c in enumerate(columns)})
        rows += cells
    partial = _some_seeds(settings["feasible"], settings["seeds"])
    notes = _summary_notes(results, oplabel, bss, partial, any_static, any_noisy)
    return Table("summary", f"Methods at the {oplabel} operating point", heads, rows, "lllr" + "r" * (len(heads) - 4),
                 starts, notes)


def _summary_reference_row(ds: str, bb: str, ref: pd.Series, bss: list[int]) -> list[Cell]:
    """The backbone's row: its own accuracy and training time; every ratio is 1 by definition."""
    return [*_group_cells(ds, bb, True), Cell("backbone (reference)"), Cell(str(int(ref["seeds"]))),
            Cell(_pm(ref, "backbone_accuracy", 100)[0]), Cell("100.0"), Cell("1.000"), Cell("1.000"),
            *[Cell("1.00") for _ in bss], Cell(_pm(ref, "backbone_seconds")[0])]


def _summary_setting_row(ds: str, bb: str, label: str, st: pd.Series, columns: list[_Column], bss: list[int]
                         ) -> tuple[list[Cell], list[float]]:
    """A method setting's row and its rounded means: (k/n) or ``infeasible`` on the accuracy when the point
    was met in only k (or none) of its seeds, ``*`` on a noisy time."""
    feasible, seeds = int(st["feasible"]), int(st["seeds"])  # iterrows gives them as floats
    row, mrow = [*_group_cells(ds, bb, False), Cell(label), Cell(str(seeds))], [math.nan] * 4
    for k, c in enumerate(columns):
        text, m = _pm(st, c.key, c.scale, c.digits)
        if k == 0 and 0 < feasible < seeds:
            text += f" ({feasible}/{seeds})"
        elif k == 0 and feasible == 0:
            text = "infeasible"
        elif 4 <= k < 4 + len(bss) and st[f"noisy {bss[k - 4]}"]:
            text += " *"
        row.append(Cell(text))
        mrow.append(m)
    return row, mrow


def _summary_static_row(ds: str, bb: str, sp: load.StaticPoint, bss: list[int]) -> tuple[list[Cell], list[float]]:
    """A static baseline's row and its rounded means: its MACs and times relative to the panel's backbone."""
    acc, m_acc = fmt_pm(sp.accuracies, 100)
    times = [fmt_pm((x.latency_ratio for x in sp.latency.get(b, [])), 1, 2) for b in bss]
    noisy = [any(x.noisy for x in sp.latency.get(b, [])) for b in bss]
    row = [*_group_cells(ds, bb, False), Cell(sp.label), Cell(str(len(sp.accuracies))), Cell(acc), Cell(DASH),
           Cell(f"{sp.rel_macs:.3f}"), Cell(f"{sp.rel_macs:.3f}"),
           *[Cell(t + (" *" if n else "")) for (t, _), n in zip(times, noisy)], Cell(fmt_pm(sp.train_seconds)[0])]
    # its train time is its whole training, not comparable with a method's own: never bold
    means = [math.nan] * 4 + [m_acc, math.nan, round(sp.rel_macs, 3), round(sp.rel_macs, 3), *[m for _, m in times],
                              math.nan]
    return row, means


def _summary_notes(results: list[load.CellResult], oplabel: str, bss: list[int], partial: bool, any_static: bool,
                   any_noisy: bool) -> list[str]:
    notes = [f"At the {oplabel} operating point: the cheapest threshold (strict MACs) whose calibration accuracy "
             f"is {load.op_drop_label(results)} or less below the backbone's (one threshold per exit where the "
             f"method calibrates per exit), reported on test; mean ± std over seeds; "
             "best per column in bold.",
             "MACs: relative to the backbone; strict counts every head evaluated on the way, paper only the "
             "head taken. time b=N: measured wall-clock of the real early-exit forward over the backbone's, "
             "batch size N" + (f" ({_devices(results)})" if bss else "") + ".",
             "train: the method's own training; post-trained methods exclude the backbone's training "
             "(its row shows that)."]
    if partial:
        notes.append("(k/n): the accuracy target is met on calibration in k of n seeds; means are over those k.")
    if any_static:
        notes.append("(static): a plain model trained with the backbone's recipe on the same data, no exits; its "
                     "MACs and time are relative to this backbone (timed side by side with it in the baseline's "
                     "cell), its train time is its whole training; agreement with the backbone is not recorded.")
    if any_noisy:
        notes.append("*: a noisy latency record (IQR above 10 % of its median); rerun on an idle machine before "
                     "trusting it.")
    return notes


PREDICTION = {"predicted": ("predicted_ratio", load.HEADLINE_VARIANT),  # column -> (latency field, variant)
              "measured": ("latency_ratio", load.HEADLINE_VARIANT), "ideal": ("latency_ratio", load.IDEAL_VARIANT)}


def prediction_table(results: list[load.CellResult]) -> Table | None:
    """Predicted (per-stage profile x exit fractions) against measured latency at the timed point: per
    method setting and batch size, the profile's prediction at the timed inputs' own exit fractions,
    compaction's measured ratio, the measured per-stage ideal, and the prediction's error."""
    cells = [r for r in load.ok(results)
             if any(x.predicted_ratio is not None for x in r.latency if x.variant == load.HEADLINE_VARIANT)]
    bss = load.batch_sizes(cells)
    if not cells or not bss:
        return None
    cols = ["dataset", "backbone", "method", "batch", "predicted", "measured (compaction)", "per-stage ideal",
            "error"]
    values = {f"{c} {b}": (lambda r, b=b, key=key, v=v: load.latency_value(r, v, b, key))
              for b in bss for c, (key, v) in PREDICTION.items()}
    settings = load.seed_stats(load.seed_frame(cells, values), load.SETTING, values)
    rows, starts = [], []
    for ds, bb, block in _panels(settings):
        starts.append(len(rows))
        for label, st in block.iterrows():
            for b in bss:
                pm, mm = st[f"predicted {b}.mean"], st[f"measured {b}.mean"]
                err = f"{100 * (pm - mm) / mm:+.0f} %" if not (math.isnan(pm) or math.isnan(mm) or mm == 0) else DASH
                rows.append([*_group_cells(ds, bb, len(rows) == starts[-1]), Cell(label), Cell(str(b)),
                             *[Cell(_pm(st, f"{c} {b}", 1, 2)[0]) for c in PREDICTION], Cell(err)])
    notes = ["Latency relative to the backbone at the timed operating point. predicted: the cell's per-stage "
             "profile (each stage and head timed alone at a few batch sizes) times the exit fractions of the very "
             "inputs that were timed, an estimate; measured: the real per-sample exit (compaction) and the "
             "per-stage ideal on those inputs; error: (predicted - measured) / measured."]
    return Table("latency_prediction", "Predicted versus measured latency", cols, rows, "lllrrrrr", starts, notes)


def reliability_table(results: list[load.CellResult]) -> Table | None:
    """Per method setting and exit: the fitted temperature and the ECE (%) on test and on the held-out part
    of calibration, before -> after per-exit temperature scaling (cells with ``evaluation.temperature``)."""
    cells = [r for r in load.ok(results) if r.temperature is not None]
    if not cells:
        return None
    cols = ["dataset", "backbone", "method", "exit", "T", "ECE test before", "after", "ECE cal. held-out before",
            "after"]
    rows, starts = [], []
    for (ds, bb), rs in load.group(cells, load.panel_key).items():
        starts.append(len(rows))
        first = True
        for label, seeds in load.group(rs, load.setting).items():
            for e, name in enumerate(load.exit_names(seeds[0])):
                temps = [r.temperature for r in seeds if e < len(r.temperature.temperatures)]
                ece = [fmt_pm([getattr(t, side)[split][e] for t in temps], 100, 1)[0]
                       for split in ("test", "calibration_held_out") for side in ("ece_before", "ece_after")]
                t = fmt_pm([x.temperatures[e] for x in temps], 1, 2)[0]
                rows.append([*_group_cells(ds, bb, first), Cell(label if e == 0 else ""), Cell(name), Cell(t),
                             *[Cell(x) for x in ece]])
                first = False
    r0 = cells[0].temperature
    notes = [f"Expected calibration error (%, {r0.bins} equal-width confidence bins) of each exit's max-softmax, "
             f"before and after dividing its logits by its temperature T. T is fitted (NLL) on {r0.fitted_on} "
             f"calibration samples; \"held-out\" is the other {r0.held_out}, which the fit never saw. Predictions "
             "and accuracies are unchanged; exit thresholds are chosen on the scaled scores."]
    return Table("reliability", "Reliability per exit: temperature scaling", cols, rows, "llllrrrrr", starts, notes)


def _op_feasible(r: load.CellResult) -> bool:
    op = load.operating_point(r)
    return op is not None and op.feasible and op.test is not None


def _devices(results: list[load.CellResult]) -> str:
    devs = sorted({str(x.device) for r in load.ok(results) for x in r.latency})
    return ", ".join(devs)


RISK_KEYS = ("rule", "risk", "eps", "delta")
RISK_VALUES = ("test_risk_mean", "test_risk_std", "violation_freq", "mean_exit_index", "rel_macs_strict_mean",
               "lambda_mean")


def risk_aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """Risk rows averaged over seeds (the finite values of each field), keyed (rule, risk, eps, delta) in
    the rows' order: ``n_seeds``, the first row's ``trials`` and ``promise``, and the mean of each value."""
    if not rows:
        return {}
    frame = pd.DataFrame(rows).reindex(columns=[*RISK_KEYS, "trials", "promise", *RISK_VALUES])
    values = frame[list(RISK_VALUES)].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    frame[list(RISK_VALUES)] = values
    groups = frame.groupby(list(RISK_KEYS), sort=False, dropna=False)
    agg = groups[list(RISK_VALUES)].mean().join(groups.size().rename("n_seeds"))
    agg = agg.join(groups[["trials", "promise"]].first())
    return {key: {"n_seeds": int(a["n_seeds"]), "trials": None if _plain(a["trials"]) is None else int(a["trials"]),
                  "promise": _plain(a["promise"]),
                  **{f: float(a[f]) for f in RISK_VALUES}}
            for key, a in ((tuple(_plain(k) for k in key), a) for key, a in agg.iterrows())}


def _plain(v: Any) -> Any:
    """A pandas/numpy scalar as the plain Python value it was stored as (NaN from a missing field: None)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def violates(agg: dict, eps: float, delta: float) -> bool:
    """Whether a rule broke its own promise (the rows' stored ``promise``) beyond trial noise (two binomial
    / standard errors). The same criterion for every rule of a kind: the population risk of each trial's
    choice."""
    trials = agg.get("trials") or 100
    if agg.get("promise") == "high-probability":
        v = agg["violation_freq"]
        return not math.isnan(v) and v > delta + 2 * math.sqrt(delta * (1 - delta) / trials)
    if agg.get("promise") == "expectation":
        m, s = agg["test_risk_mean"], agg["test_risk_std"]
        return not math.isnan(m) and m > eps + 2 * (0 if math.isnan(s) else s) / math.sqrt(trials)
    return False


def risk_table(rows: list[dict], name: str, title: str, eps: float | None = None,
               delta: float | None = None) -> Table:
    """One risk-control group at one (eps, delta): per risk and rule, population risk, violation frequency,
    relative MACs, mean exit and lambda. Bold: the cheapest deployable rule that kept its guarantee."""
    eps = load.representative((x.get("eps") for x in rows), 0.05) if eps is None else eps
    delta = load.representative((x.get("delta") for x in rows), 0.1) if delta is None else delta
    agg = risk_aggregate(rows)
    cols = ["risk", "rule", "risk at λ̂", "P(risk > ε)", "rel. MACs ↓", "mean exit", "λ"]
    out, starts, flagged = [], [], False
    for risk in load.ordered(x.get("risk") for x in rows):
        starts.append(len(out))
        block, cand = [], []
        for rule in load.ordered(x.get("rule") for x in rows):
            a = agg.get((rule, risk, eps, delta))
            if a is None:
                continue
            bad = violates(a, eps, delta)
            flagged |= bad
            risk_txt = f"{a['test_risk_mean']:.3f}"
            if not math.isnan(a["test_risk_std"]):
                risk_txt += f" ± {a['test_risk_std']:.3f}"
            row = [Cell(risk if not block else ""), Cell(rule + (" †" if bad else "")), Cell(risk_txt),
                   Cell(_f(a["violation_freq"], 2)), Cell(_f(a["rel_macs_strict_mean"], 3)),
                   Cell(_f(a["mean_exit_index"], 2)), Cell(_f(a["lambda_mean"], 2))]
            block.append(row)
            if a.get("promise") != "none" and not bad and not math.isnan(a["rel_macs_strict_mean"]):
                cand.append((round(a["rel_macs_strict_mean"], 3), row))
        if cand:
            best = min(c[0] for c in cand)
            for m, row in cand:
                if m == best:
                    row[4].bold = True
        out += block
    trials = sorted({x.get("trials") for x in rows if x.get("trials")})
    n_cal = sorted({x.get("n_cal") for x in rows if x.get("n_cal")})
    allow = " or ".join(f"{2 * math.sqrt(delta * (1 - delta) / t):.3f}" for t in trials) or "?"
    notes = [f"ε = {eps:g}, δ = {delta:g}; n_cal = {', '.join(map(str, n_cal)) or '?'} drawn with replacement "
             f"from the pooled calibration + test samples, {', '.join(map(str, trials)) or '?'} trials; the pool is "
             "the population: risk at λ̂ is the pool's exact risk at each trial's choice (mean ± std over trials), "
             "P(risk > ε) the fraction of trials where it exceeded ε; means over seeds.",
             f"Criterion, the same for every rule: UCB/LTT rules promise P(risk > ε) ≤ δ and break it when "
             f"P(risk > ε) > δ + {allow} (two binomial standard errors of the trial noise); CRC promises mean "
             "risk ≤ ε and breaks it when the mean exceeds ε by two standard errors; crc-raw is the reference's "
             "rule on non-monotone losses (no guarantee); naive, oracle and random promise nothing.",
             "Bold: the cheapest rule (strict MACs relative to the backbone) that is deployable and kept its "
             "guarantee (naive, crc-raw, oracle and random are contrasts)."]
    if flagged:
        notes.append("†: broke its guarantee beyond trial noise (the criterion above).")
    return Table(name, title, cols, out, "llrrrrr", starts, notes)


def _f(v: float, digits: int) -> str:
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------- renderers

def to_markdown(t: Table, notes: bool = True) -> str:
    def cell(c: Cell) -> str:
        s = c.text.replace("|", "\\|")
        return f"**{s}**" if c.bold and s else s

    sep = ["---:" if a == "r" else ":---" for a in t.align]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in t.columns) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    if notes and t.notes:
        lines += [""] + [f"{n}  " if i < len(t.notes) - 1 else n for i, n in enumerate(t.notes)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"\ensuremath{\pm}", "—": "--", "†": r"\ensuremath{^\dagger}", "↑": r"\ensuremath{\uparrow}",
                  "↓": r"\ensuremath{\downarrow}", "ε": r"\ensuremath{\varepsilon}", "δ": r"\ensuremath{\delta}",
                  "λ": r"\ensuremath{\lambda}", "×": r"\ensuremath{\times}", "≤": r"\ensuremath{\le}",
                  ">": r"\ensuremath{>}", "<": r"\ensuremath{<}"}


def latex_escape(s: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)
    for u, tex in _LATEX_UNICODE.items():
        out = out.replace(u, tex)
    return out


def to_latex(t: Table) -> str:
    """A ``table`` float with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    def cell(c: Cell) -> str:
        s = latex_escape(c.text)
        return rf"\textbf{{{s}}}" if c.bold and s else s

    lines = ["% Generated by `exitbench report`; needs \\usepackage{booktabs}.", r"\begin{table}[t]",
             r"\centering", r"\small", rf"\caption{{{latex_escape(t.title)}}}", rf"\label{{tab:{t.name}}}",
             rf"\begin{{tabular}}{{{t.align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for i, row in enumerate(t.rows):
        if i in t.group_starts and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(cell(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + " ".join(latex_escape(n) for n in t.notes) + "}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    def cell(c: Cell, a: str) -> str:
        s = html.escape(c.text)
        return f'<td class="{a}">' + (f"<strong>{s}</strong>" if c.bold and s else s) + "</td>"

    head = "".join(f'<th class="{a}">{html.escape(c)}</th>' for c, a in zip(t.columns, t.align))
    body = []
    for i, row in enumerate(t.rows):
        cls = ' class="group"' if i in t.group_starts and i > 0 else ""
        body.append(f"<tr{cls}>" + "".join(cell(c, a) for c, a in zip(row, t.align)) + "</tr>")
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in t.notes)
    return (f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f"{notes}\n")
