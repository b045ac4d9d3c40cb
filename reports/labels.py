"""Display labels: what a reader sees for a method setting or an operating point, made from typed values
and never parsed back (sorting and grouping use the values themselves)."""

from __future__ import annotations

import json
from typing import Any

from exitbench.core.results import CellResult, OperatingPoint, result_setting_id
from exitbench.core.spec import Cell


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def point_label(p: OperatingPoint) -> str:
    """An operating point for display, e.g. ``within 1 pt``, ``≤ 50 % MACs``."""
    t = p.target
    return {
        "accuracy_drop": lambda: f"within {t * 100:g} pt",
        "accuracy_drop_per_exit": lambda: f"within {t * 100:g} pt, per exit",
        "patience": lambda: f"patience, within {t * 100:g} pt",
        "macs_budget": lambda: f"≤ {t * 100:g} % MACs",
        "msdnet_budget": lambda: f"MSDNet ≤ {t * 100:g} % MACs",
        "latency_budget": lambda: f"≤ {t * 100:g} % latency (b=1, predicted)",
    }.get(p.kind, lambda: p.kind.replace("_", " "))()


def setting_label(cell: Cell) -> str:
    """A short label of a cell's method setting from its swept keys, e.g. ``pteenet lam=1`` (not unique:
    see :func:`setting_labels`)."""
    return " ".join([cell.method, *(f"{k}={_fmt(cell.hparams.get(k))}" for k in cell.swept)])


def _setting_fields(cell: Cell) -> dict[str, Any]:
    """Every field a setting can differ in, by a display name."""
    out = dict(cell.hparams)
    for k in ("init", "regime", "weights", "small_stem", "method_version"):
        v = getattr(cell, k)
        out[k] = None if v == "" else v  # "": not said (a result stored before its schema had the field)
    out.update({f"backbone.{k}": v for k, v in vars(cell.backbone_training).items()})
    out.update({f"data.{k}": v for k, v in cell.data_options().items()})
    return out


def label_key(result: CellResult) -> tuple[str, str, str]:
    """The key of a result in :func:`setting_labels`: its panel and its setting id."""
    return (result.config.dataset, result.config.backbone, result_setting_id(result))


def setting_labels(results: list[CellResult]) -> dict[tuple[str, str, str], str]:
    """:func:`label_key` -> a short label, unique within its (dataset, backbone) panel: the swept keys,
    plus every field that tells apart settings which would otherwise share a label (e.g.
    ``pteenet loss=v1`` / ``pteenet loss=v2``)."""
    by_id = {label_key(r): r.config for r in results}
    groups: dict[tuple, list[tuple]] = {}
    for sid, c in by_id.items():
        groups.setdefault((sid[0], sid[1], setting_label(c)), []).append(sid)
    out = {}
    for (_, _, label), sids in groups.items():
        if len(sids) == 1:
            out[sids[0]] = label
            continue
        fields = {sid: _setting_fields(by_id[sid]) for sid in sids}
        keys = sorted({k for f in fields.values() for k in f
                       if len({_fmt(g.get(k)) for g in fields.values()}) > 1})
        for sid in sids:
            out[sid] = " ".join([label, *(f"{k}={_fmt(fields[sid].get(k))}" for k in keys)])
    seen: dict[tuple, int] = {}
    for sid, lab in out.items():
        seen[sid[:2], lab] = seen.get((sid[:2], lab), 0) + 1
    return {sid: (f"{lab} [{sid[2][:6]}]" if seen[sid[:2], lab] > 1 else lab) for sid, lab in out.items()}
