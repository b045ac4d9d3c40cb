"""Plain statements of when a static baseline matches an early-exit operating point.

The honest competitor of an early-exit operating point is a smaller plain model at the same accuracy. For
every (dataset, backbone) panel this compares each static baseline next to the backbone with each method
setting's headline operating point (chosen on calibration, reported on test), in means over seeds:

- the baseline **matches** a point when its MACs are at most the point's strict MACs and its test accuracy
  is at least the point's minus the point's spread over seeds (its sample std; 0 with one seed);
- it **beats** it when it also is at least as accurate outright.

Both sides are test numbers of models trained on the same data with the same backbone recipe, so the
comparison is like for like; latency is in the summary table (measured side by side with the backbone).
"""

from __future__ import annotations

from dataclasses import dataclass

from exitbench.reports import load


@dataclass
class Match:
    dataset: str
    backbone: str
    baseline: load.StaticPoint
    setting: str
    point_accuracy: float
    point_std: float
    point_macs: float
    beats: bool

    point: str  # how the point was chosen, e.g. "within 1 pt"

    @property
    def text(self) -> str:
        acc = load.mean_std(self.baseline.accuracies)[0]
        verb = "beats" if self.beats else "matches"
        return (f"{self.backbone} on {self.dataset}: **{self.baseline.model}** (static) {verb} {self.setting}'s "
                f"{self.point} point: {100 * acc:.1f} % at {self.baseline.rel_macs:.2f}× MACs against "
                f"{100 * self.point_accuracy:.1f} % at {self.point_macs:.2f}×")


def matches(results: list[load.CellResult]) -> tuple[list[Match], list[str]]:
    """(every static baseline x operating point it matches, one line per baseline that matches none)."""
    found, none = [], []
    statics = load.baselines(results)
    oplabel = load.op_label(load.ok(results))
    for (ds, bb), cells in load.group(load.ok(results), load.panel_key).items():
        points = []
        for label, seeds in load.group(cells, load.setting).items():
            acc = load.mean_std(load.op_value(r, "accuracy") for r in seeds)
            macs = load.mean_std(load.op_value(r, "rel_macs_strict") for r in seeds)
            if acc[2] and macs[2]:
                points.append((label, acc[0], acc[1] if acc[2] > 1 else 0.0, macs[0]))
        for sp in load.static_points(statics, ds, bb, load.panel_macs(cells)):
            s_acc = load.mean_std(sp.accuracies)[0]
            hits = [Match(ds, bb, sp, label, a, sd, m, s_acc >= a, oplabel) for label, a, sd, m in points
                    if sp.rel_macs <= m + 1e-9 and s_acc >= a - sd - 1e-12]
            found += hits
            if not hits and points:
                none.append(f"{bb} on {ds}: {sp.model} (static, {100 * s_acc:.1f} % at {sp.rel_macs:.2f}× MACs) "
                            f"matches no {oplabel} point: " + _why_not(sp.rel_macs, s_acc, points))
    return found, none


def _why_not(macs: float, acc: float, points: list[tuple[str, float, float, float]]) -> str:
    """Why a baseline matches no point: an early-exit point dominates it, or every point at its cost or
    above is more accurate, or every point is cheaper (and so not comparable at its cost)."""
    dominating = sorted((p for p in points if p[3] <= macs and p[1] >= acc), key=lambda p: p[3])
    if dominating:
        label, a, _, m = dominating[0]
        return f"{label}'s point is cheaper and at least as accurate ({100 * a:.1f} % at {m:.2f}×)"
    if any(p[3] >= macs for p in points):
        return "every point that costs at least as much is more accurate"
    return "every point is cheaper"
