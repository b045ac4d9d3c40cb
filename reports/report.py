"""``exitbench report RESULTS_DIR``: Markdown and self-contained HTML reports, LaTeX tables, figures.

The report is assembled once as a list of blocks (headings, paragraphs, tables, figures) and rendered
twice, so ``report.md`` and ``report.html`` always say the same thing. Layout of ``--out``::

    report.md  report.html  tables/*.tex *.md (+ risk_control.csv)  figures/*.png *.pdf
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from exitbench.core.store import check_writable_dir, write_atomic, write_text_atomic
from exitbench.reports import figures, load, risk_summary, significance, static, sweeps, tables


@dataclass
class Fig:
    stem: str
    caption: str


Block = tuple  # ("h1"|"h2"|"h3"|"p"|"code", text) | ("table", Table) | ("figure", Fig)


def _failures(results: list[load.CellResult]) -> list[str]:
    out = []
    for r in results:
        if not r.ok:
            what = str(r.error or "").strip()
            what = what.splitlines()[0] if what else "no message recorded"
            out.append(f"`{r.cell or Path(r.path or '?').stem}`: {r.status}: {what}")
    return out


@dataclass
class _Writer:
    """Writes a report's figures and tables as they are made and records them as blocks, in order."""

    fig_dir: Path
    tab_dir: Path
    log: Callable[[str], None] | None = None
    blocks: list[Block] = field(default_factory=list)
    written: dict = field(default_factory=lambda: {"figures": [], "tables": []})

    def figure(self, fig, stem: str, caption: str) -> None:
        """Save ``fig`` (None: nothing to draw, nothing written) as PNG and PDF, with its caption."""
        if fig is None:
            return
        self.written["figures"] += figures.save(fig, self.fig_dir, stem)
        self.blocks.append(("figure", Fig(stem, caption)))
        if self.log:
            self.log(f"figure {stem}")

    def table(self, t: tables.Table) -> None:
        """Write ``t`` as LaTeX and Markdown under ``tables/``."""
        self.tab_dir.mkdir(parents=True, exist_ok=True)
        for ext, text in (("tex", tables.to_latex(t)), ("md", tables.to_markdown(t))):
            self.written["tables"].append(write_text_atomic(self.tab_dir / f"{t.name}.{ext}", text))
        self.blocks.append(("table", t))


def build(results_dir: str | Path, out_dir: str | Path, paper_view: bool = False,
          log=None, all_cells: bool = False) -> dict[str, list[Path] | Path]:
    """Write the whole report for ``results_dir`` into ``out_dir``; returns the paths written, and under
    ``missing`` the latest run's cells that have no result (the report says it is partial)."""
    results = load.load_cells(results_dir, all_cells)
    out = Path(out_dir)
    w = _Writer(out / "figures", out / "tables", log)
    w.written["missing"] = _opening(results_dir, results, w.blocks)
    good, statics = load.ok(results), load.baselines(results)
    if good:
        shown = good + statics  # the figures and tables that put static baselines beside the methods
        devs = load.devices(good)
        _accuracy_sections(w, good, statics, paper_view)
        _methods_sections(w, good, load.on_device(shown, devs[0]) if devs else shown)  # the device the cells ran on
        _latency_section(w, good, shown, devs)
        _risk_section(good, w.blocks, w.figure, w.table, w.tab_dir, w.written)
    fails = _failures(results)
    if fails:
        w.blocks += [("h2", "Failed cells"), ("ul", fails)]
    w.blocks += [("h2", "Files"),
                 ("p", "LaTeX tables (booktabs) are in `tables/`, every figure as PNG and PDF in `figures/`.")]
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    write_text_atomic(md, to_markdown(w.blocks))
    write_text_atomic(page, to_html(w.blocks, w.fig_dir))
    w.written["report"] = [md, page]
    return w.written


def _opening(results_dir: str | Path, results: list[load.CellResult], blocks: list[Block]) -> list[str]:
    """The title, what was read, whether the view is partial, the environment; returns the missing cells."""
    good, statics = load.ok(results), load.baselines(results)
    blocks.append(("h1", f"exitbench report: {Path(results_dir).resolve().name}"))
    n_set = len(load.by_setting([r for r in results if not r.static]))
    n_static = len({(r.config.dataset, r.config.backbone) for r in statics})
    blocks.append(("p", f"{len(results)} cell results in `{results_dir}`: {len(good) + len(statics)} ok, "
                        f"{sum(r.status == 'error' for r in results)} errors; {n_set} method settings"
                        + (f", {n_static} static baselines" if statics else "") + ". "
                        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."))
    listed, missing = load.missing_cells(results_dir, results)
    if missing:  # a partial view says so, and which cells it lacks
        shown = ", ".join(f"`{c}`" for c in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20
                                                             else "")
        blocks.append(("p", f"**Partial: this report covers {listed - len(missing)} of the {listed} cells of the "
                            f"latest run**; {len(missing)} have no result yet (still running, not run, or "
                            f"unreadable): {shown}."))
    blocks.append(("p", f"Environment: {load.env_note(results)}."))
    return missing


def _accuracy_sections(w: _Writer, good: list[load.CellResult], statics: list[load.CellResult],
                       paper_view: bool) -> None:
    """Accuracy against cost (figures), the static baselines' matches, the budget and significance tables."""
    shown, oplabel = good + statics, load.op_label(good)
    w.blocks.append(("h2", "Accuracy versus cost"))
    w.figure(figures.accuracy_vs_macs(shown), "accuracy_vs_macs",
             "Test accuracy against strict relative MACs (every head evaluated on the way counts). One curve "
             "per method setting: the threshold sweep on test, mean over seeds on a common MACs grid with a "
             f"± std band; circles: the {oplabel} operating point chosen on calibration; star: the backbone"
             + ("; diamonds: static baselines (plain models trained with the backbone's recipe) at their own "
                "MACs." if statics else "."))
    if paper_view:
        w.figure(figures.accuracy_vs_macs(shown, view="paper"), "accuracy_vs_cost_reduction",
                 "The PTEENet/EENet view: test accuracy against cost reduction in paper accounting (the "
                 "backbone prefix plus only the head taken; rejected heads are free).")
    if statics:
        _static_section(shown, w.blocks)
    w.blocks.append(("h2", "Accuracy at a MACs budget"))
    w.table(tables.budget_table(shown))
    if load.budgets(good, "msdnet_budget"):
        w.table(tables.budget_table(good, kind="msdnet_budget"))
    sig = significance.significance_table(shown)
    if sig is not None:
        w.table(sig)


def _methods_sections(w: _Writer, good: list[load.CellResult], main_view: list[load.CellResult]) -> None:
    """The summary table (latency on ``main_view``'s device), the swept hyper-parameters, reliability and
    where samples exit."""
    oplabel = load.op_label(good)
    w.blocks.append(("h2", f"Methods at the {oplabel} operating point"))
    w.table(tables.summary_table(main_view))
    sweep = sweeps.sweep_table(good)
    if sweep is not None:
        w.blocks.append(("h2", "Trade-off hyper-parameters"))
        w.figure(sweeps.sweep_figure(good), "sweeps",
                 "Each swept method at its own rule (e.g. PTEENet's h > tau, no calibration): relative cost "
                 "(paper accounting solid, strict dashed) and test accuracy / agreement against the swept value, "
                 "mean ± std over seeds; gray dotted: the published sweep, in its own setting.")
        w.table(sweep)
    rel = tables.reliability_table(good)
    if rel is not None:
        w.blocks.append(("h2", "Reliability per exit (temperature scaling)"))
        w.table(rel)
    w.blocks.append(("h2", "Where samples exit"))
    w.figure(figures.exit_distribution(good), "exit_distribution",
             f"Fraction of test samples leaving at each exit at the {oplabel} operating point (mean over "
             "seeds).")


def _latency_section(w: _Writer, good: list[load.CellResult], shown: list[load.CellResult], devs: list[str]) -> None:
    """One latency panel per device (``exitbench time`` adds devices): the latency figure, the predicted
    against measured table and the variants side by side."""
    if load.batch_sizes(good):
        w.blocks.append(("h2", "Latency"))
    for i, dev in enumerate(devs):
        view, tail = load.on_device(shown, dev), "" if i == 0 else f"__{load.slug(dev)}"
        if len(devs) > 1:
            w.blocks.append(("h3", f"On {dev}"))
        w.figure(figures.latency(view), f"latency{tail}",
                 f"Measured wall-clock on {dev} of the real early-exit forward relative to the backbone against "
                 "the MACs ratio on the same inputs, per batch size; realisation 1 means every MAC saved "
                 "became time saved.")
        pred = tables.prediction_table(view)
        if pred is not None:
            pred.name += tail
            w.table(pred)
        w.figure(figures.latency_variants(view), f"latency_variants{tail}",
                 f"The execution strategies side by side on {dev} at the timed operating point, per batch size: "
                 "time relative to the backbone; the red tick is the per-stage ideal (compaction with zero "
                 "overhead); hatched bars are simulations.")


def _static_section(results: list[load.CellResult], blocks: list[Block]) -> None:
    """Says plainly which static baselines match which operating points (``exitbench.reports.static``)."""
    found, none = static.matches(results)
    blocks.append(("h2", "Static baselines against the operating points"))
    oplabel = load.op_label(load.ok(results))
    blocks.append(("p", f"A static baseline matches an operating point ({oplabel}, per method setting) when it costs "
                        "at most the point's strict MACs and its test accuracy is at least the point's minus the "
                        "point's std over seeds; it beats it when it is at least as accurate outright (means over "
                        "seeds, both trained on the same data with the same backbone recipe)."))
    if found:
        blocks.append(("p", f"{len(found)} operating point(s) are matched by a smaller static model: there, the "
                            "early exits buy nothing that a plain smaller network does not."))
        blocks.append(("ul", [m.text for m in found]))
    else:
        blocks.append(("p", "No static baseline matches any operating point: every early-exit point here is a better "
                            "trade-off than the plain models listed."))
    if none:
        blocks.append(("ul", none))


def _risk_section(good, blocks, figure, table, tab_dir: Path, written: dict) -> None:
    groups = figures.risk_groups(good)
    if not groups:
        return
    blocks.append(("h2", "Risk control"))
    summary = risk_summary.risk_summary_table(good)
    if summary is not None:
        table(summary)
    vs = risk_summary.versus(good)
    if vs is not None:
        blocks.append(("p", risk_summary.versus_text(vs)))
    blocks.append(("p", "**Per method setting.**"))
    blocks.append(("p", "Thresholds chosen to bound a risk on calibration sets drawn with replacement from the "
                        "pooled calibration + test samples; each choice is judged by the pool's exact (population) "
                        "risk. Top: mean risk at the chosen λ against the target ε (CRC promises it stays under the "
                        "diagonal); middle: the fraction of trials whose risk exceeded ε against δ (UCB and LTT "
                        "promise at most δ); bottom: the cost of the chosen thresholds. One line per selection rule; "
                        "oracle (the cheapest λ within ε on the population) and random exits are contrasts."))
    rows_csv = []
    for (ds, bb, lab, n_cal), rows in groups.items():
        name = f"{bb} on {ds}, {lab}, n_cal = {n_cal}"
        stem = load.slug("risk_control", ds, bb, lab, f"ncal{n_cal}")
        blocks.append(("h3", name))
        members = [r for r in good if load.setting_key(r) == (ds, bb, lab)]
        figure(figures.risk_control(rows, name, load.env_note(members)), stem, f"Risk control: {name}.")
        table(tables.risk_table(rows, stem.replace("risk_control", "risk", 1), f"Risk control: {name}"))
        for k, a in tables.risk_aggregate(rows).items():  # in the stored (registry) order
            rows_csv.append({"dataset": ds, "backbone": bb, "method": lab, "n_cal": n_cal, "rule": k[0],
                             "risk": k[1], "eps": k[2], "delta": k[3], **a})
    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
            w.writeheader()
            w.writerows(rows_csv)

    written["tables"].append(write_atomic(tab_dir / "risk_control.csv", write_csv))


# ----------------------------------------------------------------------------------------- rendering

def to_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + x)
        elif kind == "p":
            out.append(x)
        elif kind == "ul":
            out.append("\n".join(f"- {i}" for i in x))
        elif kind == "table":
            out.append(f"**{x.title}.**\n\n" + tables.to_markdown(x).rstrip())
        elif kind == "figure":
            out.append(f"![{x.stem}](figures/{x.stem}.png)\n\n*{x.caption}* ([PDF](figures/{x.stem}.pdf))")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ccc;padding-bottom:.2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{padding:.25em .7em}thead th{border-top:2px solid #222;border-bottom:1px solid #222}
tbody tr:last-child td{border-bottom:2px solid #222}tr.group td{border-top:1px solid #999}
td.r,th.r{text-align:right}td.l,th.l{text-align:left}
p.note{font-size:.82em;color:#444;margin:.2em 0}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88em;color:#333;margin-top:.3em}code{font-size:.92em;background:#f3f3f3;padding:0 .2em}
"""


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def to_html(blocks: list[Block], fig_dir: Path) -> str:
    """One file with every figure embedded as a base64 PNG."""
    title = next((x for k, x in blocks if k == "h1"), "exitbench report")
    body = []
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(x)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(x)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in x) + "</ul>")
        elif kind == "table":
            body.append(f"<p><strong>{html.escape(x.title)}.</strong></p>" + tables.to_html(x))
        elif kind == "figure":
            data = base64.b64encode((fig_dir / f"{x.stem}.png").read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(x.stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(x.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------- CLI

def cmd_report(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else Path(args.results) / "report"
    try:
        check_writable_dir(out, "--out")  # before the figures are drawn
        written = build(args.results, out, paper_view=args.paper_view, all_cells=getattr(args, "all", False))
    except load.UserError as e:
        print(f"exitbench: error: {e}", file=sys.stderr)
        return 2
    n_fig = sum(p.suffix == ".png" for p in written["figures"])
    print(f"exitbench: report of {args.results} -> {out} ({n_fig} figures, "
          f"{sum(p.suffix == '.tex' for p in written['tables'])} LaTeX tables) in {time.perf_counter() - t0:.1f} s")
    for p in written["report"]:
        print(f"  {p}")
    if written["missing"]:
        print(f"exitbench: partial: {len(written['missing'])} cells of the latest run have no result yet; the report "
              "says which")
    return 0
