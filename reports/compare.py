"""``exitbench compare A B``: what changed between two results directories.

Cells are matched by (dataset, backbone, setting_id, seed): settings that differ in anything are never
paired, and every cell without a partner is listed. Metrics are compared per method setting (a static
baseline included: its own accuracy and its latency against its backbone) over
seeds. The direction of each metric comes from the results' declared ``higher_is_better``.
A change is called significant only when it exceeds ``k`` times the pooled seed spread
sqrt((s_A^2 + s_B^2) / 2), which needs at least two seeds on both sides; with one seed nothing is
significant, and the report says so. New failures, missing cells, version and machine mismatches and
changed configurations are flagged. The exit code is 0 whatever changed (2 for a bad path).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from exitbench.core.store import check_writable_dir, write_text_atomic
from exitbench.reports import load

Getter = Callable[[dict], float | None]


@dataclass
class Metric:
    id: str
    label: str
    direction: str  # key into higher_is_better
    scale: float
    digits: int
    get: Getter


def metrics_for(results: list[dict]) -> list[Metric]:
    """Every comparable metric present in ``results`` (stable order)."""
    ms = [Metric("backbone.test_accuracy", "backbone / static model test accuracy (%)", "test_accuracy", 100, 2,
                 lambda r: r.backbone.test_accuracy if r.backbone else None)]
    op = load.op_label(results)
    for key, label, scale, digits in (("accuracy", "test accuracy (%)", 100, 2), ("agreement", "agreement (%)", 100, 2),
                                      ("rel_macs_strict", "relative MACs, strict", 1, 4),
                                      ("rel_macs_paper", "relative MACs, paper", 1, 4)):
        ms.append(Metric(f"op.{key}", f"{op}: {label}", key, scale, digits,
                         lambda r, k=key: load.op_value(r, k)))
    for b in load.budgets(results):
        ms.append(Metric(f"budget.{b:g}", f"accuracy at {100 * b:g} % MACs (%)", "accuracy", 100, 2,
                         lambda r, b=b: load.budget_accuracy(r, b)))
    keys = sorted({(x.variant, x.batch_size) for r in load.finished(results) for x in r.latency},
                  key=lambda k: (str(k[0]), k[1] or 0))
    for variant, bs in keys:
        ms.append(Metric(f"latency.{variant}.b{bs}.median_ms", f"{variant} median ms, batch {bs}", "median_ms", 1, 3,
                         lambda r, k=(variant, bs): load.latency_value(r, *k, "median_ms")))
        if variant != "backbone":
            for key in ("latency_ratio", "realisation"):
                ms.append(Metric(f"latency.{variant}.b{bs}.{key}", f"{variant} {key.replace('_', ' ')}, batch {bs}",
                                 key, 1, 3, lambda r, k=key, b=bs, v=variant: load.latency_value(r, v, b, k)))
    ms.append(Metric("training.seconds_per_epoch", "training s/epoch", "seconds_per_epoch", 1, 3,
                     lambda r: r.training.get("seconds_per_epoch")))
    return ms


def _setting_key(r: dict) -> tuple:
    return (*load.panel_key(r), load.result_setting_id(r))


def _cell_key(r: dict) -> tuple:
    return (*_setting_key(r), str(load.seed(r)))


def _labels(*sides: list[dict]) -> dict[str, str]:
    """setting_id -> label for display (the later side's label wins)."""
    return {load.result_setting_id(r): load.setting(r) for rs in sides for r in rs}


def _cells(results: list[dict]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in results:
        k = _cell_key(r)
        if k not in out or (r.mtime or 0) > (out[k].mtime or 0):  # the newest file wins
            out[k] = r
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _values(results: list[dict], field: Callable[[dict], object]) -> list[str]:
    return sorted({str(v) for v in (field(r) for r in results) if v is not None}, key=load.order_key)


def flags(a: list[dict], b: list[dict]) -> list[str]:
    """Failures, missing cells, version / machine mismatches and changed configurations."""
    out = []
    ca, cb = _cells(a), _cells(b)
    labels = _labels(a, b)
    name = lambda k: f"{k[1]} on {k[0]}, {labels.get(k[2], k[2])} [{k[2][:6]}], seed {k[3]}"
    for k in sorted(cb, key=load.order_key):
        rb, ra = cb[k], ca.get(k)
        if rb.status == "error":
            why = str(rb.error or "").strip().splitlines()[:1]
            what = ("NEW FAILURE" if ra is not None and ra.status != "error" else
                    "still failing" if ra is not None else "failing (new cell)")
            out.append(f"{what}: {name(k)}: {why[0] if why else 'no message'}")
        elif ra is not None and ra.status == "error" and rb.ok:
            out.append(f"fixed: {name(k)} (an error in A, ok in B)")
    # unmatched cells are listed one by one: a setting that changed shows up here, never mis-paired
    for side, ks in (("only in A (no match in B)", [k for k in ca if k not in cb]),
                     ("only in B (no match in A)", [k for k in cb if k not in ca])):
        out += [f"{side}: {name(k)}" for k in sorted(ks, key=load.order_key)]
    okA, okB = load.finished(a), load.finished(b)
    pkgs = sorted({p for r in okA + okB for p in ((r.env or {}).get("packages") or {})})
    checks: list[tuple[str, Callable[[load.CellResult], object]]] = [
        (f"{p} version", lambda r, p=p: ((r.env or {}).get("packages") or {}).get(p)) for p in pkgs]
    checks += [("python", lambda r: (r.env or {}).get("python")),
               ("schema version", lambda r: r.schema_version),
               ("device", lambda r: (r.env or {}).get("device")),
               ("CPU", lambda r: (r.env or {}).get("cpu")),
               ("threads", lambda r: (r.env or {}).get("threads"))]
    for m in sorted({r.config.method for r in okA + okB}):
        checks.append((f"{m} method version", lambda r, m=m: (r.config.method_version or None)
                       if r.config.method == m else None))
    for what, field in checks:
        va, vb = _values(okA, field), _values(okB, field)
        if va and vb and va != vb:
            kind = "machine mismatch (latencies not comparable)" if what in ("device", "CPU", "threads") \
                else "version mismatch"
            out.append(f"{kind}: {what} {' / '.join(va)} (A) vs {' / '.join(vb)} (B)")
    ga, gb = _values(okA, lambda r: (r.env or {}).get("git_commit")), \
        _values(okB, lambda r: (r.env or {}).get("git_commit"))
    if ga and gb and ga != gb:
        out.append(f"code: git commit {' / '.join(c[:10] for c in ga)} (A) vs {' / '.join(c[:10] for c in gb)} (B)")
    da, db = load.directions(okA), load.directions(okB)
    for k in sorted(set(da) & set(db)):
        if da[k] != db[k]:
            out.append(f"schema mismatch: higher_is_better[{k}] is {da[k]} in A and {db[k]} in B (B's is used)")
    changed = []
    ignore = {"method_version", "where"}
    for k in sorted(set(ca) & set(cb), key=load.order_key):
        fa, fb = _flat(asdict(ca[k].config)), _flat(asdict(cb[k].config))
        diff = sorted(x for x in set(fa) | set(fb) if x not in ignore and fa.get(x) != fb.get(x))
        if diff:
            changed.append(f"{name(k)}: " + ", ".join(f"{x} {fa.get(x)!r} -> {fb.get(x)!r}" for x in diff[:4])
                           + (", ..." if len(diff) > 4 else ""))
    if changed:
        out.append(f"config changed in {len(changed)} matched cells: " + "; ".join(changed[:3])
                   + ("; ..." if len(changed) > 3 else ""))
    return out


@dataclass
class Change:
    key: tuple
    metric: Metric
    higher: bool | None
    a: tuple[float, float, int]
    b: tuple[float, float, int]
    verdict: str
    significant: bool


def changes(a: list[dict], b: list[dict], k: float = load.SEED_K) -> list[Change]:
    """Per (method setting, metric) present on both sides, over the seeds both sides have: the change and
    its verdict."""
    # early-exit cells and static baselines alike: a static model's own accuracy and its latency against
    # its backbone are compared like any cell's (it has no operating point, budget or training rows)
    fa, fb = load.finished(a), load.finished(b)
    hib = {**load.directions(fa), **load.directions(fb)}
    ga, gb = load.group(fa, _setting_key), load.group(fb, _setting_key)
    out = []
    mets = metrics_for(fa + fb)
    for key in sorted(set(ga) & set(gb), key=load.order_key):
        sa, sb = {load.seed(r): r for r in ga[key]}, {load.seed(r): r for r in gb[key]}
        common = [x for x in sa if x in sb]  # the same seeds on both sides, or the means would differ by design
        for m in mets:
            va = load.mean_std(m.get(sa[x]) for x in common)
            vb = load.mean_std(m.get(sb[x]) for x in common)
            if not va[2] or not vb[2]:
                continue
            d = vb[0] - va[0]
            higher = hib.get(m.direction)
            if abs(d) * m.scale < 0.5 * 10 ** -m.digits:
                verdict, sig = "unchanged", False
            else:
                better = None if higher is None else (d > 0) == higher
                word = "changed" if better is None else "better" if better else "worse"
                sig = load.seed_significant(va, vb, k)
                if sig is None:
                    verdict, sig = f"{word}, 1 seed (no spread)", False
                else:
                    verdict = f"**{word.upper()}**" if sig else f"{word}, within seed spread"
                if better is None:
                    verdict += " (direction not declared)"
            out.append(Change(key, m, higher, va, vb, verdict, sig))
    return out


def _fmt(v: tuple[float, float, int], m: Metric) -> str:
    mean, std, n = v
    s = f"{mean * m.scale:.{m.digits}f}"
    return s + (f" ± {std * m.scale:.{m.digits}f}" if n > 1 else "") + f" (n={n})"


def render(a_dir: str | Path, b_dir: str | Path, a: list[dict], b: list[dict], k: float = load.SEED_K,
           show_all: bool = False) -> str:
    cs = changes(a, b, k)
    fl = flags(a, b)
    moved = [c for c in cs if c.verdict != "unchanged"]
    sig = [c for c in cs if c.significant]
    nb = sum((c.higher is not None and (c.b[0] - c.a[0] > 0) == c.higher) for c in sig)

    def counts(rs: list[dict]) -> str:
        return f"{len(rs)} cells, {len(load.finished(rs))} ok"

    lines = ["# exitbench compare", "", f"- A: `{a_dir}` ({counts(a)})", f"- B: `{b_dir}` ({counts(b)})",
             f"- significant: |change| > {k:g} × pooled seed std, sqrt((s_A² + s_B²) / 2), with at least 2 seeds "
             "on both sides; only seeds present on both sides are compared; direction from the results' "
             "higher_is_better", "", "## Flags", ""]
    lines += [f"- {f}" for f in fl] or ["- none"]
    lines += ["", f"## Changes: {len(moved)} of {len(cs)} metrics moved; {len(sig)} significant "
                  f"({nb} better, {len(sig) - nb} worse)", ""]
    rows = cs if show_all else moved
    labels = _labels(a, b)
    if rows:
        lines += ["| dataset | backbone | method | metric | better | A | B | change | verdict |",
                  "| :--- | :--- | :--- | :--- | :---: | ---: | ---: | ---: | :--- |"]
        for c in rows:
            arrow = "?" if c.higher is None else "↑" if c.higher else "↓"
            d = (c.b[0] - c.a[0]) * c.metric.scale
            lab = labels.get(c.key[2], c.key[2])
            lines.append(f"| {c.key[0]} | {c.key[1]} | {lab} | {c.metric.label} | {arrow} | "
                         f"{_fmt(c.a, c.metric)} | {_fmt(c.b, c.metric)} | {d:+.{c.metric.digits}f} | {c.verdict} |")
    else:
        lines.append("No metric moved." if cs else "No method setting has results on both sides.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- CLI

def cmd_compare(args: argparse.Namespace) -> int:
    try:
        if args.k <= 0:
            raise load.ReportError(f"--k must be positive, not {args.k:g}")
        if args.out:
            check_writable_dir(Path(args.out).parent, "--out")
        a, b = load.load_cells(args.a, args.all), load.load_cells(args.b, args.all)
    except load.UserError as e:
        print(f"exitbench: error: {e}", file=sys.stderr)
        return 2
    text = render(args.a, args.b, a, b, args.k, args.unchanged)
    print(text, end="")
    if args.out:
        write_text_atomic(args.out, text)
    return 0
