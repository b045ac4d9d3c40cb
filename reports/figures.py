"""Figures from stored results, drawn with one style file (``exitbench.mplstyle``).

Every series varies colour, line style and marker together so that figures survive grayscale print,
and every figure carries a footnote with the environment the numbers were measured in (device, torch
and timm versions, date). Each function returns a matplotlib Figure (or None when the results hold
nothing to draw); :func:`save` writes it as PNG and PDF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from exitbench.core.store import write_atomic  # noqa: E402
from exitbench.reports import load  # noqa: E402
from exitbench.reports.tables import risk_aggregate  # noqa: E402

STYLE = Path(__file__).with_name("exitbench.mplstyle")
FOOT_FONTSIZE = 6.5


@contextlib.contextmanager
def style():
    with plt.style.context(STYLE):
        yield


def _cycle() -> list[dict]:
    with style():
        return list(plt.rcParams["axes.prop_cycle"])


def series_styles(labels: list[str]) -> dict[str, dict]:
    """label -> plot kwargs (color, linestyle, marker); past the cycle's length markers turn hollow."""
    cyc = _cycle()
    out = {}
    for i, lab in enumerate(labels):
        kw = dict(cyc[i % len(cyc)])
        if i >= len(cyc):
            kw["markerfacecolor"] = "white"
        out[lab] = kw
    return out


def rule_styles(rules: list[str]) -> dict[str, dict]:
    """Risk-control rules: the cycle for the selection rules, fixed gray styles for the two baselines."""
    special = {"oracle": {"color": "0.55", "linestyle": "-", "marker": "", "linewidth": 3.0, "alpha": 0.55},
               "random": {"color": "0.45", "linestyle": (0, (1, 1.5)), "marker": "x"}}
    base = series_styles([r for r in rules if r not in special])  # rules in the stored (registry) order
    return {r: special.get(r) or base[r] for r in rules}


# ------------------------------------------------------------------------------------------- layout

def panel_grid(n: int, ncols: int = 3, w: float = 4.0, h: float = 3.1):
    ncols = max(1, min(n, ncols))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def finish_figure(fig, handles: list, labels: list[str], note: str, ncol: int | None = None,
            handler_map: dict | None = None) -> None:
    """Grow the figure at the bottom for a shared legend and the environment footnote, then lay out."""
    w, h = fig.get_size_inches()
    foot = textwrap.wrap(note, width=int(w * 19)) or [""]
    foot_h = 0.1 + 0.115 * len(foot)
    leg_h, rows = 0.0, 0
    if handles:
        longest = max(len(lab) for lab in labels)
        per_col = 0.55 + 0.065 * longest  # inches per legend column at 7.5 pt
        ncol = ncol or max(1, min(len(labels), int(w * 0.95 // per_col)))
        rows = math.ceil(len(labels) / ncol)
        leg_h = 0.12 + 0.2 * rows
    fig.set_size_inches(w, h + foot_h + leg_h)
    H = h + foot_h + leg_h
    fig.tight_layout(rect=(0, (foot_h + leg_h) / H, 1, 1), h_pad=1.2, w_pad=1.0)
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, (foot_h - 0.02) / H), ncol=ncol,
                   frameon=False, handler_map=handler_map or {}, columnspacing=1.6)
    fig.text(0.008, 0.06 / H, "\n".join(foot), fontsize=FOOT_FONTSIZE, color="0.3", ha="left", va="bottom",
             linespacing=1.25)


def collect_legend(handles: dict, ax) -> None:
    for hd, lab in zip(*ax.get_legend_handles_labels()):
        if not lab.startswith("_"):
            handles.setdefault(lab, hd)


def save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """PNG (150 dpi) and PDF (fonts embedded, no creation date: byte-stable across runs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    write_atomic(pdf, lambda tmp: fig.savefig(tmp, format="pdf",
                                              metadata={"CreationDate": None, "Creator": None, "Producer": None}))
    plt.close(fig)
    return [png, pdf]


def _seeds_note(results: list[dict]) -> str:
    counts = sorted({len(v) for v in load.by_setting(results).values()})
    if not counts:
        return ""
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return f"; {n} seed{'s' if counts[-1] > 1 else ''} per method"


# ------------------------------------------------------------------------------------ accuracy vs cost

_LABEL_BOX = {"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.4}  # a static baseline's name over the curves

def accuracy_vs_macs(results: list[dict], view: str = "strict"):
    """Test accuracy vs strict relative MACs per (dataset, backbone): one curve per method setting (mean
    over seeds, interpolated on a common MACs grid, with a ± std band), the calibrated within-drop
    operating point, the backbone as a reference, and the static baselines next to the backbone as
    diamonds at their own MACs (mean ± std over seeds). ``view="paper"``: accuracy vs cost reduction in
    paper accounting, as PTEENet/EENet plot it."""
    if view not in ("strict", "paper"):
        raise ValueError(f"view must be 'strict' or 'paper', not {view!r}")
    cells = [r for r in load.ok(results) if r.sweep is not None and r.sweep.test]
    statics = load.baselines(results)
    if not cells:
        return None
    xkey = "rel_macs_strict" if view == "strict" else "rel_macs_paper"
    tx = (lambda x: np.asarray(x)) if view == "strict" else (lambda x: 100 * (1 - np.asarray(x)))
    labels = load.settings(cells)
    st = series_styles(labels)
    oplabel = load.op_label(cells)
    with style():
        panels = load.group(cells, load.panel_key)
        fig, axes = panel_grid(len(panels))
        handles: dict = {}
        band = False
        for ax, ((ds, bb), rs) in zip(axes, panels.items()):
            for label, seeds in load.group(rs, load.setting).items():
                band |= _setting_curve(ax, seeds, label, st[label], xkey, tx)
            _references(ax, rs, load.static_points(statics, ds, bb, load.panel_macs(rs)), view, tx)
            if view == "strict":
                ax.axvline(1.0, color="0.6", lw=0.8, ls=":", zorder=0)
                ax.set_xlabel("relative MACs (strict accounting)")
            else:
                ax.set_xlabel("cost reduction (%, paper accounting)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{bb} on {ds}")
            collect_legend(handles, ax)
        extra = [Line2D([], [], ls="", marker="o", ms=8, mfc="none", mec="0.2", mew=1.3)]
        names = [f"{oplabel} (chosen on calibration)"]
        if band:
            extra.append(Patch(color="0.5", alpha=0.25, lw=0))
            names.append("± std over seeds")
        order = [lab for lab in labels if lab in handles] + [k for k in handles if k not in labels]
        finish_figure(fig, [handles[k] for k in order] + extra, order + names,
                      load.env_note(cells) + _seeds_note(cells))
    return fig


# --------------------------------------------------------------------------------- exit distribution

def exit_distribution(results: list[dict]):
    """Fraction of test samples leaving at each exit, per method setting, at the calibrated within-drop
    operating point (mean over seeds); the test accuracy and strict MACs of that point above each bar."""
    cells = [r for r in load.ok(results) if load.operating_point(r)]
    if not cells:
        return None
    oplabel = load.op_label(cells)
    panels = load.group(cells, load.panel_key)
    n_bars = max(len(load.group(rs, load.setting)) for rs in panels.values())
    n_exits = max(len(r.exits) for r in cells) or 1
    with style():
        fig, axes = panel_grid(len(panels), w=max(3.0, 0.75 * n_bars + 1.6), h=3.3)
        cmap = plt.get_cmap("cividis")
        hatches = ["", "////", "....", "xxx", "\\\\\\\\", "++", "oo"]
        cats = [f"exit {i + 1}" for i in range(n_exits - 1)] + ["final exit"]
        look = {c: {"facecolor": cmap(0.08 + 0.8 * i / max(n_exits - 2, 1)), "hatch": hatches[i % len(hatches)]}
                for i, c in enumerate(cats[:-1])}
        look["final exit"] = {"facecolor": "0.93", "hatch": ""}
        for ax, ((ds, bb), rs) in zip(axes, panels.items()):
            groups = load.group(rs, load.setting)
            shift = (n_bars - len(groups)) / 2
            for j0, seeds in enumerate(groups.values()):
                j = j0 + shift
                fr = [load.op_value(r, "exit_fractions") for r in seeds]
                fr = [f for f in fr if f]
                if not fr:
                    ax.text(j, 0.5, "infeasible", rotation=90, ha="center", va="center", fontsize=7, color="0.3")
                    continue
                k = max(len(f) for f in fr)
                mean = np.mean([np.pad(f, (0, k - len(f))) for f in fr if len(f) == k], axis=0)
                bottom = 0.0
                for i, v in enumerate(mean):
                    cat = "final exit" if i == k - 1 else f"exit {i + 1}"
                    ax.bar(j, v, 0.68, bottom=bottom, edgecolor="0.15", linewidth=0.6, label=cat, **look[cat])
                    bottom += v
                acc = load.mean_std(load.op_value(r, "accuracy") for r in seeds)[0]
                macs = load.mean_std(load.op_value(r, "rel_macs_strict") for r in seeds)[0]
                ax.text(j, 1.02, f"{100 * acc:.1f}%\n{macs:.2f}×", ha="center", va="bottom", fontsize=6.5)
            ax.set_xticks(np.arange(len(groups)) + shift, list(groups), rotation=25 if n_bars > 2 else 0,
                          ha="right" if n_bars > 2 else "center", fontsize=7.5)
            ax.set_xlim(-0.6, n_bars - 0.4)
            ax.set_ylim(0, 1.22)
            ax.set_yticks(np.linspace(0, 1, 6))
            ax.grid(axis="x", visible=False)
            ax.set_ylabel("fraction of test samples")
            ax.set_title(f"{bb} on {ds}")
        handles = [Patch(edgecolor="0.15", linewidth=0.6, **look[c]) for c in cats]
        note = (f"At the {oplabel} operating point (chosen on calibration); above the bars: test accuracy and "
                f"strict relative MACs. " + load.env_note(cells) + _seeds_note(cells))
        finish_figure(fig, handles, cats, note)
    return fig


# ------------------------------------------------------------------------------------------- latency

_FILLS = ["none", "full", "left", "bottom", "right", "top"]


def _setting_curve(ax, seeds: list, label: str, kw: dict, xkey: str, tx: Callable) -> bool:
    """One setting's accuracy-vs-MACs curve (mean over seeds, ± std band) and its calibrated operating point
    (mean ± std over seeds); whether a band was drawn."""
    mc = load.mean_curve([load.test_curve(r, xkey) for r in seeds])
    if mc is None:
        return False
    x, m, s = mc
    ax.plot(tx(x), 100 * m, label=label, markevery=0.1, **kw)
    if len(seeds) > 1:
        ax.fill_between(tx(x), 100 * (m - s), 100 * (m + s), color=kw["color"], alpha=0.16, lw=0)
    pts = [(load.op_value(r, xkey), load.op_value(r, "accuracy")) for r in seeds]
    pts = [p for p in pts if None not in p]
    if pts:
        px, py = np.array([p[0] for p in pts]), 100 * np.array([p[1] for p in pts])
        err = (np.std(tx(px), ddof=1), np.std(py, ddof=1)) if len(pts) > 1 else (None, None)
        ax.errorbar(float(np.mean(tx(px))), float(py.mean()), xerr=err[0], yerr=err[1], fmt="o",
                    ms=8, mfc="none", mec=kw["color"], ecolor=kw["color"], mew=1.3, zorder=4)
    return len(seeds) > 1


def _references(ax, rs: list, statics: list, view: str, tx: Callable) -> None:
    """The panel's backbone (a star, mean ± std over seeds) and its static baselines (diamonds, named)."""
    per_seed = {load.seed(r): r.backbone.test_accuracy for r in rs}
    bm, bs, bn = load.mean_std(per_seed.values())
    if bn:
        ax.errorbar(1.0 if view == "strict" else 0.0, 100 * bm, yerr=100 * bs if bn > 1 else None,
                    fmt="*", color="black", ms=11, zorder=5, label="backbone")
    for sp in statics:
        am, asd, an = load.mean_std(sp.accuracies)
        sx = float(tx(sp.rel_macs))
        ax.errorbar(sx, 100 * am, yerr=100 * asd if an > 1 else None, fmt="D", color="0.3", mfc="white",
                    ms=6.5, mew=1.3, zorder=5, label="static baseline (plain model, same recipe)")
        ax.annotate(sp.model, (sx, 100 * am), textcoords="offset points", xytext=(5, -11), fontsize=6.5,
                    color="0.2", bbox=_LABEL_BOX, zorder=6)


def _bar_look(fill: str, color) -> dict:
    if fill == "full":
        return {"facecolor": color, "edgecolor": color, "hatch": ""}
    if fill == "none":
        return {"facecolor": "white", "edgecolor": color, "hatch": "////"}
    return {"facecolor": "white", "edgecolor": color, "hatch": "...."}


@dataclasses.dataclass
class _LatencyLook:
    """What every panel of the latency figure shares: batch sizes, their fills, the settings' styles, how many
    bar groups the widest panel has, and the legend handles collected so far."""

    bss: list[int]
    fill: dict[int, str]
    styles: dict[str, dict]
    n_bars: int
    handles: dict = dataclasses.field(default_factory=dict)


def latency(results: list[dict]):
    """Per (dataset, backbone): measured time ratio vs MACs ratio of the real early-exit forward (one
    marker per method setting, fill per batch size, mean ± std over seeds), and the realisation
    (1 - time ratio) / (1 - MACs ratio) as bars with their values."""
    cells = [r for r in load.ok(results) if any(x.latency_ratio is not None for x in r.latency)]
    if not cells:
        return None
    statics = load.baselines(results)
    bss = load.batch_sizes(cells)
    panels = load.group(cells, load.panel_key)
    look = _LatencyLook(bss, {b: _FILLS[i % len(_FILLS)] if len(bss) > 1 else "full" for i, b in enumerate(bss)},
                        series_styles(load.settings(cells)),
                        max(len(load.group(rs, load.setting)) for rs in panels.values()))
    with style():
        w_right = max(3.6, 0.55 * look.n_bars * len(bss) + 1.4)
        fig, axes = plt.subplots(len(panels), 2, figsize=(4.0 + w_right, 3.2 * len(panels)), squeeze=False,
                                 gridspec_kw={"width_ratios": [4.0, w_right]})
        for (left, right), ((ds, bb), rs) in zip(axes, panels.items()):
            groups = load.group(rs, load.setting)
            shift = (look.n_bars - len(groups)) / 2
            real_vals, bounds = _latency_settings(left, right, groups, shift, look)
            bounds = _latency_statics(left, load.static_points(statics, ds, bb, load.panel_macs(rs)), look, bounds)
            _time_vs_macs_axes(left, f"{bb} on {ds}: time vs MACs", bounds)
            _realisation_axes(right, real_vals, list(groups), shift, look)
        handles = _latency_legend(look)
        finish_figure(fig, list(handles.values()), list(handles), _latency_note(cells),
                      handler_map={tuple: HandlerTuple(ndivide=None)})
    return fig


def _latency_settings(left, right, groups: dict, shift: float, look: _LatencyLook) -> tuple[list, tuple]:
    """Each method setting's points (time vs MACs, mean ± std over seeds, joined across batch sizes) on
    ``left`` and its realisation bars on ``right``; returns the bars' values to label and the (low, high)
    of the points."""
    lo, hi = 1.0, 1.0
    real_vals = []
    width = 0.8 / max(len(look.bss), 1)
    for j0, (label, seeds) in enumerate(groups.items()):
        kw = look.styles[label]
        path = []
        for i, b in enumerate(look.bss):
            dyn = [d for d in (load.latency(r).get((load.HEADLINE_VARIANT, b)) for r in seeds) if d]
            if not dyn:
                continue
            mx = load.mean_std(d.macs_ratio_strict for d in dyn)
            ty = load.mean_std(d.latency_ratio for d in dyn)
            if mx[2] and ty[2]:
                left.errorbar(mx[0], ty[0], xerr=mx[1] if mx[2] > 1 else None, yerr=ty[1] if ty[2] > 1 else None,
                              ls="", marker=kw["marker"], color=kw["color"], fillstyle=look.fill[b], ms=7, mew=1.2,
                              zorder=4)
                path.append((b, mx[0], ty[0]))
                lo, hi = min(lo, mx[0], ty[0]), max(hi, mx[0], ty[0])
            x = j0 + shift + (i - (len(look.bss) - 1) / 2) * width
            bar = _realisation_bar(right, x, width, dyn, look.fill[b], kw["color"])
            if bar is not None:  # (x, value, spread, noisy, MACs above the backbone's)
                real_vals.append((*bar, any(load.latency_noisy(r, b) for r in seeds), bool(mx[2]) and mx[0] > 1))
        if len(path) > 1:
            left.plot([p[1] for p in path], [p[2] for p in path], color=kw["color"], ls=kw["linestyle"], marker="",
                      lw=0.8, alpha=0.7, zorder=3)
        look.handles.setdefault(label, Line2D([], [], color=kw["color"], ls=kw["linestyle"], lw=0.8,
                                              marker=kw["marker"], ms=6))
    return real_vals, (lo, hi)


def _realisation_bar(ax, x: float, width: float, dyn: list, fill: str, color) -> tuple[float, float, float] | None:
    """One realisation bar (mean ± std over seeds) at ``x``, or "n/a" when none was recorded; returns
    (x, mean, spread) for its label."""
    re_ = load.mean_std(d.realisation for d in dyn)
    if not re_[2]:
        ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6.5)
        return None
    ax.bar(x, re_[0], width * 0.92, linewidth=1.0, **_bar_look(fill, color))
    spread = re_[1] if re_[2] > 1 else 0.0
    if spread:
        ax.errorbar(x, re_[0], yerr=spread, fmt="none", ecolor="0.2", elinewidth=0.8, capsize=2)
    return x, re_[0], spread


def _latency_statics(ax, points: list[load.StaticPoint], look: _LatencyLook, bounds: tuple) -> tuple:
    """The static baselines as diamonds at their own MACs (time against the panel's backbone, mean ± std
    over seeds), each named once; returns the (low, high) widened by them."""
    lo, hi = bounds
    for sp in points:
        for b in look.bss:
            ty = load.mean_std(x.latency_ratio for x in sp.latency.get(b, []))
            if not ty[2]:
                continue
            ax.errorbar(sp.rel_macs, ty[0], yerr=ty[1] if ty[2] > 1 else None, ls="", marker="D", color="0.3",
                        fillstyle=look.fill[b], ms=6, mew=1.2, zorder=4)
            if b == look.bss[0] or not any(sp.latency.get(c) for c in look.bss[:look.bss.index(b)]):  # name it once
                ax.annotate(sp.model, (sp.rel_macs, ty[0]), textcoords="offset points", xytext=(5, -9), fontsize=6,
                            color="0.2", bbox=_LABEL_BOX, zorder=6)
            lo, hi = min(lo, sp.rel_macs, ty[0]), max(hi, sp.rel_macs, ty[0])
            look.handles.setdefault("static baseline", Line2D([], [], ls="", marker="D", color="0.3", ms=6))
    return lo, hi


def _time_vs_macs_axes(ax, title: str, bounds: tuple) -> None:
    """The time-vs-MACs panel's diagonal (time ratio = MACs ratio), the no-speed-up line, limits and labels."""
    lo, hi = bounds
    pad = 0.05 * (hi - lo + 0.1)
    lim = (lo - pad, hi + pad)
    ax.plot(lim, lim, color="0.45", lw=0.9, ls="--", marker="", zorder=1)
    ax.axhline(1.0, color="0.6", lw=0.9, ls=":", zorder=1)
    ax.set_xlim(lim)
    ax.set_ylim(min(lim[0], ax.get_ylim()[0]), max(lim[1], ax.get_ylim()[1]))
    ax.set_xlabel("MACs ratio (strict, timed inputs)")
    ax.set_ylabel("time ratio (measured)")
    ax.set_title(title)


def _realisation_axes(ax, real_vals: list, labels: list[str], shift: float, look: _LatencyLook) -> None:
    """The realisation panel: each bar's value written on it (clipped bars marked ↑ or ↓, * noisy, † MACs
    above the backbone's), the reference lines, limits and one tick per method setting."""
    vals = [v for _, v, _, _, _ in real_vals]
    top = max(1.25, min(max(vals, default=1.0), 2.5) + 0.3)
    bottom = min(0.0, max(min(vals, default=0.0), -1.5)) - 0.15
    for x, v, sp, noisy, above in real_vals:
        clipped = v > top + 0.2 or v < bottom
        y = (top + 0.05 if v > top + 0.2 else bottom + 0.05 if v < bottom
             else v + sp + 0.03 if v >= 0 else v - sp - 0.03)
        ax.text(x, y, f"{v:.2f}" + (" ↑" if v > top + 0.2 else " ↓" if v < bottom else "")
                + (" *" if noisy else "") + (" †" if above else ""), ha="center",
                va="bottom" if v >= 0 else "top", fontsize=6.5, rotation=90 if len(look.bss) > 2 else 0,
                bbox={"fc": "white", "ec": "none", "pad": 0.6} if clipped else None)
    ax.axhline(1.0, color="0.45", lw=0.9, ls="--")
    ax.axhline(0.0, color="0.2", lw=0.8)
    ax.set_ylim(bottom, top + 0.25)
    ax.set_xticks(np.arange(len(labels)) + shift, labels, rotation=25 if look.n_bars > 2 else 0,
                  ha="right" if look.n_bars > 2 else "center", fontsize=7.5)
    ax.set_xlim(-0.6, look.n_bars - 0.4)
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("realisation")
    ax.set_title("realisation = (1 − time ratio) / (1 − MACs ratio)")


def _latency_legend(look: _LatencyLook) -> dict:
    """The collected handles, then the reference lines and one marker-and-bar pair per batch size."""
    handles = {**look.handles, "time ratio = MACs ratio": Line2D([], [], color="0.45", lw=0.9, ls="--"),
               "no speed-up": Line2D([], [], color="0.6", lw=0.9, ls=":")}
    for b in look.bss:
        handles[f"batch {b}"] = (Line2D([], [], ls="", marker="o", color="0.3", fillstyle=look.fill[b], ms=6),
                                 Patch(linewidth=1.0, **_bar_look(look.fill[b], "0.3")))
    return handles


def _latency_note(cells: list[load.CellResult]) -> str:
    devs = sorted({str(x.device) for r in cells for x in r.latency})
    return (f"Timed on {', '.join(devs)}: median of per-repeat paired ratios of the real early-exit forward vs "
            "the backbone on the same inputs (a static baseline: the plain model vs the backbone, timed side by "
            "side in its own cell); *: a noisy record (IQR > 10 % of its median); †: MACs above the "
            "backbone's, so a positive realisation means time rose with them. " + load.env_note(cells)
            + _seeds_note(cells))


def latency_variants(results: list[load.CellResult]):
    """The latency variants side by side: one row of panels per (dataset, backbone), one panel per batch
    size; per method setting a group of bars, one per variant, with its time relative to the backbone
    (mean over seeds, ± std), simulations hatched, and the per-stage ideal as a red reference tick."""
    cells = [r for r in load.ok(results) if any(x.variant != "backbone" for x in r.latency)]
    if not cells:
        return None
    variants = load.ordered(x.variant for r in cells for x in r.latency
                            if x.variant not in ("backbone", load.IDEAL_VARIANT))
    if not variants:
        return None
    simulated = {x.variant for r in cells for x in r.latency if x.simulation}
    bss = load.batch_sizes(cells)
    panels = load.group(cells, load.panel_key)
    st = series_styles(variants)
    n_bars = max(len(load.group(rs, load.setting)) for rs in panels.values())
    with style():
        w = max(3.4, 0.32 * n_bars * len(variants) + 1.0)
        fig, axes = plt.subplots(len(panels), len(bss), figsize=(w * len(bss), 3.0 * len(panels)), squeeze=False)
        handles: dict = {}
        width = 0.8 / len(variants)
        for row, ((ds, bb), rs) in zip(axes, panels.items()):
            groups = load.group(rs, load.setting)
            for ax, b in zip(row, bss):
                for j, seeds in enumerate(groups.values()):
                    for i, v in enumerate(variants):
                        m, sd, n = load.mean_std(load.latency_value(r, v, b, "latency_ratio") for r in seeds)
                        if not n:
                            continue
                        x = j + (i - (len(variants) - 1) / 2) * width
                        look = {"facecolor": st[v]["color"], "edgecolor": st[v]["color"]}
                        if v in simulated:
                            look = {"facecolor": "white", "edgecolor": st[v]["color"], "hatch": "////"}
                        ax.bar(x, m, width * 0.92, linewidth=1.0, label=v, **look)
                        if n > 1:
                            ax.errorbar(x, m, yerr=sd, fmt="none", ecolor="0.2", elinewidth=0.8, capsize=2)
                    ideal = load.mean_std(load.latency_value(r, load.IDEAL_VARIANT, b, "latency_ratio") for r in seeds)
                    if ideal[2]:
                        ax.hlines(ideal[0], j - 0.45, j + 0.45, color="#c0392b", lw=1.8, zorder=5,
                                  label="per-stage ideal")
                ax.axhline(1.0, color="0.45", lw=0.9, ls="--", zorder=1, label="backbone")
                ax.set_xticks(np.arange(len(groups)), list(groups), rotation=25 if len(groups) > 2 else 0,
                              ha="right" if len(groups) > 2 else "center", fontsize=7.5)
                ax.set_xlim(-0.6, max(len(groups), 1) - 0.4)
                ax.grid(axis="x", visible=False)
                ax.set_ylabel("time / backbone time")
                ax.set_title(f"{bb} on {ds}, batch {b}")
                collect_legend(handles, ax)
        order = [v for v in variants if v in handles] + [k for k in ("per-stage ideal", "backbone") if k in handles]
        labels = [f"{v} (simulation)" if v in simulated else v for v in order]
        devs = sorted({str(x.device) for r in cells for x in r.latency})
        note = (f"Timed on {', '.join(devs)}, every variant on the same inputs in rotated order; bars: median of the "
                "per-repeat paired ratios to the backbone (mean ± std over seeds); hatched: simulations, not "
                "deployable; red tick: each stage and head timed alone on exactly the samples that reach it. "
                + load.env_note(cells) + _seeds_note(cells))
        finish_figure(fig, [handles[k] for k in order], labels, note)
    return fig


# -------------------------------------------------------------------------------------- risk control

def risk_groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Risk-control rows grouped by (dataset, backbone, setting, n_cal)."""
    return load.group(load.risk_rows(results), lambda x: (x["dataset"], x["backbone"], x["setting"], x["n_cal"]))


def risk_control(rows: list[dict], title: str, note: str):
    """One risk-control group: per risk (columns), population risk at the choice vs eps with the diagonal, violation
    frequency vs delta with the diagonal, and relative MACs vs eps; one line per rule."""
    if not rows:
        return None
    agg = risk_aggregate(rows)
    risks = load.ordered(x.get("risk") for x in rows)
    rules = load.ordered(x.get("rule") for x in rows)
    epss = sorted(set(load.finite(x.get("eps") for x in rows)))
    deltas = sorted(set(load.finite(x.get("delta") for x in rows)))
    d_rep, e_rep = load.representative(deltas, 0.1), load.representative(epss, 0.05)
    st = rule_styles(rules)
    with style():
        fig, axes = plt.subplots(3, len(risks), figsize=(3.3 * len(risks) + 0.3, 8.4), squeeze=False)
        handles: dict = {}
        for c, risk in enumerate(risks):
            a_risk, a_viol, a_macs = axes[0][c], axes[1][c], axes[2][c]
            for rule in rules:
                kw = {"ms": 4.5, **st[rule]}
                pts = [(e, agg.get((rule, risk, e, d_rep))) for e in epss]
                pts = [(e, a) for e, a in pts if a]
                if pts:
                    e = [p[0] for p in pts]
                    a_risk.plot(e, [p[1]["test_risk_mean"] for p in pts], label=rule, **kw)
                    a_macs.plot(e, [p[1]["rel_macs_strict_mean"] for p in pts], label=rule, **kw)
                pv = [(d, agg.get((rule, risk, e_rep, d))) for d in deltas]
                pv = [(d, a) for d, a in pv if a]
                if pv:
                    a_viol.plot([p[0] for p in pv], [p[1]["violation_freq"] for p in pv], label=rule, **kw)
                collect_legend(handles, a_risk)
                collect_legend(handles, a_viol)
            top = max(epss)
            a_risk.plot([0, top], [0, top], color="0.35", lw=1.0, ls=(0, (4, 2)), marker="", zorder=1)
            a_risk.set_xlim(0, top * 1.08)
            dtop = max(deltas)
            a_viol.plot([0, dtop], [0, dtop], color="0.35", lw=1.0, ls=(0, (4, 2)), marker="", zorder=1)
            a_viol.set_xlim(0, dtop * 1.15)
            a_viol.set_ylim(-0.03, min(1.03, max(a_viol.get_ylim()[1], dtop * 1.3)))
            a_macs.axhline(1.0, color="0.45", lw=0.9, ls=":")
            a_macs.set_xlim(0, top * 1.08)
            a_risk.set_title(risk)
            a_risk.set_xlabel("ε (target risk)")
            a_viol.set_xlabel("δ")
            a_macs.set_xlabel("ε (target risk)")
            if c == 0:
                a_risk.set_ylabel(f"risk at λ̂, population (δ = {d_rep:g})")
                a_viol.set_ylabel(f"P(risk > ε), ε = {e_rep:g}")
                a_macs.set_ylabel(f"relative MACs, strict (δ = {d_rep:g})")
        fig.suptitle(title, fontsize=10)
        order = [r for r in rules if r in handles]
        diag = Line2D([], [], color="0.35", lw=1.0, ls=(0, (4, 2)))
        finish_figure(fig, [handles[r] for r in order] + [diag], order + ["diagonal: ε, δ"], note)
    return fig
