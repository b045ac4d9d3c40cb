"""A method's trade-off hyper-parameter swept: what its own operating rule gives as the parameter moves.

For every method setting swept over one hyper-parameter (PTEENet's and JEI-DNN's ``lam``), at the
method's own rule (its ``method_default`` point: PTEENet exits when the confidence h > tau, as its paper
and reference code do; nothing is calibrated), per (dataset, backbone): the relative cost in paper
accounting (what the PTEENet/EENet papers plot: the backbone prefix plus the head taken) and in strict
accounting, the test accuracy and the agreement with the backbone, mean ± std over seeds. Where a
published sweep of the same parameter exists (:data:`PUBLISHED`), it is drawn beside ours, labelled with
its setting, so a reader can see which trend carries over and which does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from exitbench.reports import load
from exitbench.reports.tables import DASH, Cell, Table, fmt_pm


@dataclass(frozen=True)
class PublishedSweep:
    """A sweep from a paper or its reference code: cost (relative, in ``accounting``) and ``quality`` (a share)
    at each value of ``hparam``."""

    method: str
    hparam: str
    values: tuple[float, ...]
    cost: tuple[float, ...]
    quality: tuple[float, ...]
    quality_name: str  # "agreement" or "accuracy": which of our series it sits beside
    accounting: str
    setting: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.method} published: {self.setting}"


PUBLISHED = {
    # The seed paper's reference code (github.com/spokV/PTEENET) commits its lambda sweep on ResNet-110 /
    # CIFAR-10 (10 exits, loss v2, tau 0.5): expected cost relative to the backbone, and agreement with the
    # backbone (its branches train on the backbone's predictions in that setting).
    ("pteenet", "lam"): PublishedSweep(
        "pteenet", "lam", (0.5, 0.9, 1.3, 1.7, 2.3), (0.922, 0.731, 0.572, 0.394, 0.246),
        (0.991, 0.972, 0.936, 0.847, 0.693), "agreement", "paper",
        "ResNet-110 on CIFAR-10, 10 exits, tau 0.5", "spokV/PTEENET, committed lambda sweep"),
}

POINT = "method_default"  # the method's own rule (e.g. PTEENet's h > tau): the point the papers sweep
METRICS = {"rel_macs_paper": "cost, paper", "rel_macs_strict": "cost, strict", "accuracy": "accuracy",
           "agreement": "agreement"}


def swept(results: list[load.CellResult]) -> pd.DataFrame:
    """One row per (dataset, backbone, method, hparam, value, seed) of the cells swept over exactly one
    hyper-parameter that have a feasible method-default point: its test metrics (:data:`METRICS`)."""
    rows = []
    for r in load.ok(results):
        c = r.config
        names = c.swept
        op = r.point(POINT, None)
        if len(names) != 1 or op is None or not op.feasible or op.test is None:
            continue
        value = c.hparams.get(names[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # a categorical sweep has no axis to draw
        rows.append({"dataset": c.dataset, "backbone": c.backbone, "method": c.method,
                     "hparam": names[0], "value": float(value), "seed": load.seed(r),
                     **{m: getattr(op.test, m) for m in METRICS}})
    return pd.DataFrame(rows, columns=["dataset", "backbone", "method", "hparam", "value", "seed", *METRICS])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds per (dataset, backbone, method, hparam, value)."""
    keys = ["dataset", "backbone", "method", "hparam", "value"]
    if df.empty:
        return pd.DataFrame(columns=keys)
    g = df.groupby(keys, sort=False)[list(METRICS)]
    out = g.agg(["mean", "std", "count"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    return out.reset_index().sort_values(keys, kind="stable")


def sweep_table(results: list[load.CellResult]) -> Table | None:
    """Per swept method and (dataset, backbone): each value's cost in both accountings, accuracy and agreement
    at the method's own rule, mean ± std over seeds; the published sweep's rows beside them."""
    df = swept(results)
    if df.empty:
        return None
    cols = ["dataset", "backbone", "method", "value", "seeds", "cost paper", "cost strict", "acc. (%)",
            "agree. (%)"]
    rows, starts = [], []
    notes = [f"At each method's own rule ({POINT}: e.g. PTEENet leaves at the first exit whose confidence h > tau), "
             "no threshold calibrated; cost relative to the backbone (paper: the prefix plus the head taken; "
             "strict: every head evaluated on the way); test split; mean ± std over seeds."]
    for (ds, bb, method, hp), part in df.groupby(["dataset", "backbone", "method", "hparam"], sort=False):
        starts.append(len(rows))
        first = True
        for value, seeds in part.groupby("value", sort=True):
            stats = [fmt_pm(seeds[m], scale, digits)[0] for m, scale, digits in
                     (("rel_macs_paper", 1, 3), ("rel_macs_strict", 1, 3), ("accuracy", 100, 1), ("agreement", 100, 1))]
            rows.append([Cell(ds if first else ""), Cell(bb if first else ""), Cell(f"{method} {hp}" if first else ""),
                         Cell(f"{value:g}"), Cell(str(len(seeds))), *map(Cell, stats)])
            first = False
    for pub in {PUBLISHED[k] for k in PUBLISHED if k in set(zip(df["method"], df["hparam"]))}:
        starts.append(len(rows))
        for i, (v, cost, q) in enumerate(zip(pub.values, pub.cost, pub.quality)):
            quality = f"{100 * q:.1f}"
            rows.append([Cell("published" if i == 0 else ""), Cell(pub.setting if i == 0 else ""),
                         Cell(f"{pub.method} {pub.hparam}" if i == 0 else ""), Cell(f"{v:g}"), Cell(DASH),
                         Cell(f"{cost:.3f}" if pub.accounting == "paper" else DASH),
                         Cell(f"{cost:.3f}" if pub.accounting == "strict" else DASH),
                         Cell(quality if pub.quality_name == "accuracy" else DASH),
                         Cell(quality if pub.quality_name == "agreement" else DASH)])
        notes.append(f"published: {pub.source} ({pub.setting}); its cost is in {pub.accounting} accounting and its "
                     f"quality is {pub.quality_name}.")
    return Table("sweeps", "Trade-off hyper-parameters swept, at each method's own rule", cols, rows,
                 "llllrrrrr", starts, notes)


def sweep_figure(results: list[load.CellResult]):
    """Cost (paper accounting solid, strict dashed) and accuracy (solid) / agreement (dashed) against the swept
    value, one row of two panels per (dataset, backbone, method), with the published sweep where there is one
    (gray, dotted). A sweep spanning a factor of 10 or more is drawn on a log axis."""
    from exitbench.reports import figures  # matplotlib only when a figure is drawn

    summ = summary(swept(results))
    if summ.empty:
        return None
    groups = sorted(summ.groupby(["dataset", "backbone", "method", "hparam"], sort=False), key=lambda g: g[0][2:])
    ours = figures.series_styles(["ours"])["ours"]
    gray = {"color": "0.45", "linestyle": ":", "marker": "x"}
    series = {"cost": (("rel_macs_paper", "paper accounting", "-"), ("rel_macs_strict", "strict accounting", "--")),
              "quality": (("accuracy", "test accuracy", "-"), ("agreement", "agreement with the backbone", "--"))}
    with figures.style():
        fig, axes = figures.panel_grid(2 * len(groups), ncols=2, w=4.2, h=3.0)
        handles: dict = {}
        for i, ((ds, bb, method, hp), s) in enumerate(groups):
            x = s["value"].to_numpy()
            for ax, what in ((axes[2 * i], "cost"), (axes[2 * i + 1], "quality")):
                for key, name, ls in series[what]:
                    m, sd = s[f"{key}_mean"].to_numpy(), s[f"{key}_std"].fillna(0).to_numpy()
                    ax.errorbar(x, m, yerr=sd, capsize=2.5, label=name, **{
                        **ours, "linestyle": ls, "markerfacecolor": "white" if ls == "--" else ours["color"]})
                pub = PUBLISHED.get((method, hp))
                if pub is not None:
                    ax.plot(pub.values, pub.cost if what == "cost" else pub.quality, **gray,
                            label=f"published: {pub.setting} (cost: {pub.accounting}; {pub.quality_name})")
                if x.min() > 0 and x.max() / x.min() >= 10:
                    ax.set_xscale("log")
                ax.set_xlabel(f"{method} {hp}")
                ax.set_ylabel("relative cost (× backbone)" if what == "cost" else "share of test samples")
                ax.set_title(f"{method}, {bb} on {ds}", fontsize=8.5)
                figures.collect_legend(handles, ax)
            axes[2 * i].set_ylim(0, max(1.05, float(axes[2 * i].get_ylim()[1])))
        n_seeds = int(summ["accuracy_count"].max())
        note = (f"At each method's own rule (no calibration); mean ± std over seeds ({n_seeds} at most). "
                + load.env_note(load.ok(results)))
        figures.finish_figure(fig, list(handles.values()), list(handles), note, ncol=2)
    return fig
