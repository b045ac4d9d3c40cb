"""The main job's outputs from stored results: a CSV summary and the accuracy-versus-cost figure.

Reads result files only (no torch): any machine with pandas and matplotlib can redraw them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.results import load_results, setting_label, summary_rows  # noqa: E402


def write_csv(results: list[dict], path: Path) -> Path:
    """One row per (cell, operating point); failed cells keep a row with their error."""
    frame = pd.DataFrame(summary_rows(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.5g")
    tmp.replace(path)
    return path


def accuracy_vs_macs(results: list[dict], path: Path) -> Path:
    """Test accuracy vs strict relative MACs: one panel per (dataset, backbone), one curve per method
    setting (its calibration-chosen threshold grid evaluated on test), the within-1-point operating
    point circled, and the backbone as a star at (1, its test accuracy)."""
    ok = [r for r in results if r.get("status") == "ok"]
    panels = sorted({(r["config"]["dataset"], r["config"]["backbone"]) for r in ok})
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    for ax, (ds, bb) in zip(axes[0], panels):
        cells = sorted((r for r in ok if (r["config"]["dataset"], r["config"]["backbone"]) == (ds, bb)),
                       key=lambda r: setting_label(r["config"]))
        labels = sorted({setting_label(r["config"]) for r in cells})
        colors = {lab: plt.cm.viridis(i / max(len(labels) - 1, 1)) for i, lab in enumerate(labels)}
        styles = ["-", "--", "-.", ":"]
        seen = set()
        for r in cells:
            lab = setting_label(r["config"])
            t = r["sweep"]["test"]
            pts = sorted(zip(t["rel_macs_strict"], t["accuracy"]))
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles[labels.index(lab) % 4],
                    color=colors[lab], lw=1.4, label=None if lab in seen else lab)
            seen.add(lab)
            for op in r["operating_points"]:
                if op.get("feasible") and op["name"].startswith("within"):
                    ax.plot(op["test"]["rel_macs_strict"], 100 * op["test"]["accuracy"], "o", mfc="none",
                            color=colors[lab], ms=7)
        accs = sorted({r["backbone"]["test_accuracy"] for r in cells})
        ax.plot([1.0] * len(accs), [100 * a for a in accs], "k*", ms=11, label="backbone")
        ax.set_title(f"{bb} on {ds}", fontsize=10)
        ax.set_xlabel("relative MACs (strict accounting)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if ok:
        env = ok[0].get("env", {})
        pk = env.get("packages", {})
        fig.text(0.01, 0.005, f"{env.get('cpu', '')}, {env.get('threads')} threads; torch {pk.get('torch')}, "
                 f"timm {pk.get('timm')}. Circles: cheapest threshold within 1 point of the backbone on calibration.",
                 fontsize=6.5, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_summary(results_dir: str | Path) -> list[Path]:
    """Write ``summary.csv`` and ``accuracy_vs_macs.png`` into ``results_dir``."""
    d = Path(results_dir)
    results = load_results(d)
    return [write_csv(results, d / "summary.csv"), accuracy_vs_macs(results, d / "accuracy_vs_macs.png")]
