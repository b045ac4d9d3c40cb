"""Tables from stored results, rendered to Markdown, LaTeX (booktabs) and HTML.

A table is built once (:class:`Table`: cells with their text and bold flag, groups, notes) and each
renderer only formats it, so the three outputs always show the same numbers. Values are mean ± std over
seeds (sample std; a single seed shows the mean alone). "Best" is decided on the displayed (rounded)
means, so equal-looking numbers are bold together.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable
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

def fmt_pm(values: Iterable, scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
    """``"96.7 ± 0.4"`` (or ``"96.7"`` for one value, ``"—"`` for none) and the rounded mean."""
    m, s, n = load.mean_std(values)
    if n == 0:
        return DASH, math.nan
    m, s = m * scale, s * scale
    text = f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text, round(m, digits)


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
    rows, starts, partial, any_static = [], [], False, False
    statics = load.baselines(results)
    by_panel = load.group(load.ok(results), load.panel_key)
    for (ds, bb), cells in by_panel.items():
        starts.append(len(rows))
        bb_acc = _per_seed(cells, lambda r: r.backbone.test_accuracy)
        base_txt, _ = fmt_pm(bb_acc, 100)
        ref = [*_group_cells(ds, bb, True), Cell("backbone (reference)"), Cell(str(len(bb_acc)))]
        ref += [Cell(base_txt if b >= 1.0 else DASH) for b in budgets]
        rows.append(ref)
        block, means = [], []
        for label, seeds in load.group(cells, load.setting).items():
            row = [*_group_cells(ds, bb, False), Cell(label), Cell(str(len(seeds)))]
            mrow = [math.nan] * 4
            for b in budgets:
                accs = [load.budget_accuracy(r, b, kind) for r in seeds]
                got = [a for a in accs if a is not None]
                text, m = fmt_pm(got, 100)
                if got and len(got) < len(accs):
                    text += f" ({len(got)}/{len(accs)})"
                    partial = True
                row.append(Cell(text))
                mrow.append(m)
            block.append(row)
            means.append(mrow)
        for sp in load.static_points(statics, ds, bb, load.panel_macs(cells)):
            text, m = fmt_pm(sp.accuracies, 100)
            block.append([*_group_cells(ds, bb, False), Cell(f"{sp.label}, {sp.rel_macs:.2f}× MACs"),
                          Cell(str(len(sp.accuracies))),
                          *[Cell(text if sp.rel_macs <= b + 1e-9 else DASH) for b in budgets]])
            means.append([math.nan] * 4 + [m if sp.rel_macs <= b + 1e-9 else math.nan for b in budgets])
            any_static = True
        _bold_best(block, means, {4 + i: True for i in range(len(budgets))})
        rows += block
    notes = [f"Test accuracy (%) at {how}; mean ± std over seeds; best method per column in bold.",
             f"{DASH}: no threshold meets the budget on calibration (infeasible)."]
    if any_static:
        notes.append("(static): a plain model trained with the backbone's recipe, no exits; its accuracy appears "
                     f"under every budget its own MACs fit, {DASH} under those they exceed; it is bold when best.")
    if partial:
        notes.append("(k/n): the budget is met in k of n seeds; the mean is over those k.")
    return Table(stem, title, cols, rows, "lllr" + "r" * len(budgets), starts, notes)


def summary_table(results: list[dict]) -> Table:
    """Per method setting at the calibrated within-drop operating point: accuracy, agreement, relative
    MACs (both accountings, separate columns), measured time ratio per batch size, training time."""
    hib = load.directions(results)
    bss = load.batch_sizes(results)
    oplabel = load.op_label(results)

    def arrow(key: str) -> str:
        return " ↑" if hib.get(key, True) else " ↓"

    cols = ["dataset", "backbone", "method", "seeds", "acc. (%)" + arrow("accuracy"),
            "agree. (%)" + arrow("agreement"), "MACs strict" + arrow("rel_macs_strict"),
            "MACs paper" + arrow("rel_macs_paper"), *[f"time b={b}" + arrow("latency_ratio") for b in bss],
            "train (s) ↓"]
    # column index -> (extractor over one seed, scale, digits, higher is better)
    specs: list[tuple[Callable[[dict], float | None], float, int, bool]] = [
        (lambda r: load.op_value(r, "accuracy"), 100, 1, hib.get("accuracy", True)),
        (lambda r: load.op_value(r, "agreement"), 100, 1, hib.get("agreement", True)),
        (lambda r: load.op_value(r, "rel_macs_strict"), 1, 3, hib.get("rel_macs_strict", False)),
        (lambda r: load.op_value(r, "rel_macs_paper"), 1, 3, hib.get("rel_macs_paper", False)),
    ]
    for b in bss:
        specs.append((lambda r, b=b: load.latency_value(r, load.HEADLINE_VARIANT, b, "latency_ratio")
                      if _op_feasible(r) else None, 1, 2, hib.get("latency_ratio", False)))
    specs.append((lambda r: r.training.get("seconds"), 1, 1, False))

    rows, starts, partial, any_noisy, any_static = [], [], False, False, False
    statics = load.baselines(results)
    for (ds, bb), cells in load.group(load.ok(results), load.panel_key).items():
        starts.append(len(rows))
        bt = _per_seed(cells, lambda r: r.backbone.training.get("seconds"))
        bb_acc = _per_seed(cells, lambda r: r.backbone.test_accuracy)
        ref = [*_group_cells(ds, bb, True), Cell("backbone (reference)"), Cell(str(len(bb_acc))),
               Cell(fmt_pm(bb_acc, 100)[0]), Cell("100.0"),
               Cell("1.000"), Cell("1.000"), *[Cell("1.00") for _ in bss], Cell(fmt_pm(bt)[0])]
        rows.append(ref)
        block, means = [], []
        for label, seeds in load.group(cells, load.setting).items():
            row = [*_group_cells(ds, bb, False), Cell(label), Cell(str(len(seeds)))]
            mrow = [math.nan] * 4
            feasible = sum(_op_feasible(r) for r in seeds)
            for k, (get, scale, digits, _) in enumerate(specs):
                text, m = fmt_pm((get(r) for r in seeds), scale, digits)
                if k == 0 and 0 < feasible < len(seeds):
                    text += f" ({feasible}/{len(seeds)})"
                    partial = True
                elif k == 0 and feasible == 0:
                    text = "infeasible"
                elif 4 <= k < 4 + len(bss) and any(_op_feasible(r) and load.latency_noisy(r, bss[k - 4])
                                                   for r in seeds):
                    text += " *"
                    any_noisy = True
                row.append(Cell(text))
                mrow.append(m)
            block.append(row)
            means.append(mrow)
        for sp in load.static_points(statics, ds, bb, load.panel_macs(cells)):
            row = [*_group_cells(ds, bb, False), Cell(sp.label), Cell(str(len(sp.accuracies)))]
            acc, m_acc = fmt_pm(sp.accuracies, 100)
            times = [fmt_pm((x.latency_ratio for x in sp.latency.get(b, [])), 1, 2) for b in bss]
            noisy = [any(x.noisy for x in sp.latency.get(b, [])) for b in bss]
            any_noisy = any_noisy or any(noisy)
            row += [Cell(acc), Cell(DASH), Cell(f"{sp.rel_macs:.3f}"), Cell(f"{sp.rel_macs:.3f}"),
                    *[Cell(t + (" *" if n else "")) for (t, _), n in zip(times, noisy)],
                    Cell(fmt_pm(sp.train_seconds)[0])]
            block.append(row)
            # its train time is its whole training, not comparable with a method's own: never bold
            means.append([math.nan] * 4 + [m_acc, math.nan, round(sp.rel_macs, 3), round(sp.rel_macs, 3),
                                           *[m for _, m in times], math.nan])
            any_static = True
        _bold_best(block, means, {4 + k: s[3] for k, s in enumerate(specs)})
        rows += block
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
    align = "lllr" + "r" * (len(cols) - 4)
    return Table("summary", f"Methods at the {oplabel} operating point", cols, rows, align, starts, notes)


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
    rows, starts = [], []
    for (ds, bb), rs in load.group(cells, load.panel_key).items():
        starts.append(len(rows))
        first = True
        for label, seeds in load.group(rs, load.setting).items():
            for b in bss:
                pred = [load.latency_value(r, load.HEADLINE_VARIANT, b, "predicted_ratio") for r in seeds]
                meas = [load.latency_value(r, load.HEADLINE_VARIANT, b, "latency_ratio") for r in seeds]
                ideal = [load.latency_value(r, load.IDEAL_VARIANT, b, "latency_ratio") for r in seeds]
                pm, mm = load.mean_std(pred)[0], load.mean_std(meas)[0]
                err = f"{100 * (pm - mm) / mm:+.0f} %" if not (math.isnan(pm) or math.isnan(mm) or mm == 0) else DASH
                rows.append([*_group_cells(ds, bb, first), Cell(label), Cell(str(b)), Cell(fmt_pm(pred, 1, 2)[0]),
                             Cell(fmt_pm(meas, 1, 2)[0]), Cell(fmt_pm(ideal, 1, 2)[0]), Cell(err)])
                first = False
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


def _per_seed(cells: list[load.CellResult], get: Callable[[load.CellResult], float | None]) -> list:
    """One value per seed: the backbone is shared by every method setting of a seed."""
    return list({load.seed(r): get(r) for r in cells}.values())


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
