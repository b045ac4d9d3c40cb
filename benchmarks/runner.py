"""Run one cell into a result, and a whole matrix into a results directory.

A cell: load the splits, prepare the backbone (pretrained, a file, or trained here and cached), let
the method place exits, build and fit its net, record one trace per split, sweep the threshold grid
on the traces, pick operating points on calibration and report them on test, and time the real
dynamic forward against the backbone. Each cell's JSON is written atomically; a rerun skips cells
whose result exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import backbones as bb
from benchmarks.config import Cell
from benchmarks.data import Splits, load_splits, make_loader, to_tensors
from benchmarks.flops import MACS_COUNTER, cost_table, head_macs
from benchmarks.latency import measure_latency
from benchmarks.results import HIGHER_IS_BETTER, SCHEMA_VERSION, env_fingerprint, read_result, write_json_atomic
from benchmarks.risk_protocol import run_protocol
from benchmarks.traces import Sweep, Trace, collect_trace, evaluate, threshold_grid
from benchmarks.training import method_trainer, predict_logits, train_backbone
from methods.base import StagedBackbone, UserError, get_method
from methods.calibration import coordinate_descent
from methods.policies import ThresholdPolicy

BACKBONE_RECIPE_VERSION = "1"  # bump when train_backbone changes in a way that changes weights


def _splits(cell: Cell, download: bool, memo: dict) -> Splits:
    opts = dict(cell.dataset_options)
    dl = bool(opts.pop("download", False)) or download
    key = json.dumps([cell.dataset, cell.seed, opts], sort_keys=True, default=str)
    if key not in memo:
        memo[key] = load_splits(cell.dataset, seed=cell.seed, download=dl, **opts)
    return memo[key]


def make_backbone(cell: Cell, splits: Splits, *, weights: bool = True) -> StagedBackbone:
    """The cell's backbone with its weights file or pretrained weights (not the harness-trained ones)."""
    info = splits.info
    path = cell.weights if cell.weights not in ("train", "pretrained") else None
    return bb.create_backbone(cell.backbone, num_classes=info.num_classes, input_size=info.input_size,
                              small_stem=cell.small_stem, pretrained=weights and cell.weights == "pretrained",
                              weights=path if weights else None)


def backbone_cache_path(cell: Cell, backbone: StagedBackbone, cache_dir: Path) -> Path:
    """Where harness-trained weights live: keyed by everything that determines them."""
    from importlib.metadata import version
    determines = {
        "backbone": cell.backbone, "small_stem": getattr(backbone, "small_stem", None),
        "input_size": list(backbone.input_size), "num_classes": backbone.num_classes,
        "dataset": cell.dataset, "dataset_options": {k: v for k, v in cell.dataset_options.items()
                                                     if k not in ("root", "download")},
        "seed": cell.seed, "recipe": asdict(cell.backbone_training), "recipe_version": BACKBONE_RECIPE_VERSION,
        "timm": version("timm"), "torch": version("torch").split("+")[0],
    }
    key = hashlib.sha256(json.dumps(determines, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{cell.dataset}__{cell.backbone}__seed{cell.seed}__{key}.safetensors"


def prepare_backbone(cell: Cell, splits: Splits, cache_dir: Path) -> tuple[StagedBackbone, dict]:
    torch.manual_seed(cell.seed)  # the initial weights are part of what the seed determines
    backbone = make_backbone(cell, splits)
    if cell.weights != "train":
        return backbone, {"weights": cell.weights}
    path = backbone_cache_path(cell, backbone, cache_dir)
    stats_path = path.with_suffix(".json")
    if path.exists() and stats_path.exists():
        bb.load_weights(backbone, path)
        return backbone, {"weights": "train", "cache": str(path), "cached": True, **read_result(stats_path)}
    budget = cell.backbone_training
    loaders = {"train": make_loader(splits.train, budget.batch_size, True, cell.seed)}
    stats = train_backbone(backbone, loaders, budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    bb.save_weights(backbone, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
    write_json_atomic(stats_path, stats)
    return backbone, {"weights": "train", "cache": str(path), "cached": False, **stats}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


def _point(name: str, g: int, cal: Sweep, test: Sweep, **extra: Any) -> dict:
    c, t = cal.row(g), test.row(g)
    return {"name": name, "threshold": c.pop("threshold"), **extra,
            "calibration": c, "test": {k: v for k, v in t.items() if k != "threshold"}}


def operating_points(cal: Sweep, test: Sweep, backbone_cal_acc: float, drop: float) -> list[dict]:
    """Operating points chosen on calibration only, reported on test.

    ``within_1pt``: the cheapest threshold (strict MACs) whose calibration accuracy is within ``drop``
    of the backbone's calibration accuracy (ties: the more accurate). Infeasible when even the final
    exit alone falls short (possible for joint methods), then marked so.
    """
    ok = cal.accuracy >= backbone_cal_acc - drop - 1e-12
    name = f"within_{drop * 100:g}pt"
    if not bool(ok.any()):
        return [{"name": name, "feasible": False, "threshold": None}]
    cost = torch.where(ok, cal.rel_macs_strict, torch.full_like(cal.rel_macs_strict, float("inf")))
    best = cost.min()
    cands = torch.nonzero(cost <= best + 1e-12).flatten()
    g = int(cands[cal.accuracy[cands].argmax()])
    return [_point(name, g, cal, test, feasible=True, chosen_on="calibration")]


def per_exit_point(cal: Trace, test: Trace, score: str, strict: list[float], paper: list[float],
                   backbone_cal_acc: float, drop: float) -> dict:
    """Per-exit thresholds by coordinate descent on calibration (scales to many exits, unlike a
    Cartesian grid): the least expected strict MACs with accuracy within ``drop`` of the backbone."""
    errors = (cal.predictions() != cal.labels[None]).double()
    thr, feasible = coordinate_descent(cal.scores(score), errors, strict, 1 - backbone_cal_acc + drop)
    name = f"within_{drop * 100:g}pt_per_exit"
    if not bool(feasible):
        return {"name": name, "feasible": False, "threshold": None}
    th = thr[None]
    return _point(name, 0, evaluate(cal, score, th, strict, paper), evaluate(test, score, th, strict, paper),
                  feasible=True, chosen_on="calibration", search="coordinate descent per exit")


def run_cell(cell: Cell, out_dir: Path, cache_dir: Path, *, download: bool = False, memo: dict | None = None) -> dict:
    """Run one cell and return its result dict (status ``ok``); raises on failure."""
    ev = cell.evaluation
    torch.set_num_threads(ev.threads)
    start = time.perf_counter()
    splits = _splits(cell, download, {} if memo is None else memo)
    num_classes = splits.info.num_classes
    backbone, backbone_stats = prepare_backbone(cell, splits, cache_dir)
    backbone.eval()
    cal_x, cal_y = to_tensors(splits.calibration)
    test_x, test_y = to_tensors(splits.test)
    bb_cal_acc = _accuracy(predict_logits(backbone, cal_x), cal_y)
    bb_test_acc = _accuracy(predict_logits(backbone, test_x), test_y)

    method = get_method(cell.method)(**cell.hparams)
    try:
        exits = method.place_exits(backbone)
    except UserError as e:
        raise UserError(f"{cell.where}.hparams: {e}") from None
    torch.manual_seed(cell.seed)  # same head initialisation for the same cell
    start_from = backbone
    if method.trains_backbone:  # joint training changes the backbone: keep the reference intact
        start_from = make_backbone(cell, splits, weights=False) if cell.init == "scratch" else copy.deepcopy(backbone)
    net = method.build(start_from, exits, num_classes)
    h_macs = [head_macs(h, e) for h, e in zip(net.heads[:-1], exits)]
    table = cost_table(backbone, exits, h_macs)
    net.rel_costs = torch.tensor(table.paper, dtype=torch.float32)

    budget = method.budget()
    loaders = {"train": make_loader(splits.train, budget.batch_size, True, cell.seed),
               "calibration": make_loader(splits.calibration, budget.batch_size, False, cell.seed)}
    train_stats = method.fit(net, loaders, budget, method_trainer)
    net.eval()

    traces = {"calibration": collect_trace(net, cal_x, cal_y), "test": collect_trace(net, test_x, test_y)}
    trace_dir = out_dir / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for split, tr in traces.items():
        tmp = trace_dir / f".{cell.slug()}.{split}.tmp"
        tr.save(tmp)
        tmp.replace(trace_dir / f"{cell.slug()}.{split}.safetensors")

    grid = threshold_grid(traces["calibration"], method.score, ev.grid_size)
    cal_sweep = evaluate(traces["calibration"], method.score, grid, table.strict, table.paper)
    test_sweep = evaluate(traces["test"], method.score, grid, table.strict, table.paper)
    points = operating_points(cal_sweep, test_sweep, bb_cal_acc, ev.accuracy_drop)
    if method.per_exit_thresholds:  # the method's own kind of operating point leads (latency is timed there)
        points.insert(0, per_exit_point(traces["calibration"], traces["test"], method.score, table.strict,
                                        table.paper, bb_cal_acc, ev.accuracy_drop))
    default = method.default_thresholds()
    if default is not None:
        th = torch.tensor([default], dtype=torch.float64)
        cal_d = evaluate(traces["calibration"], method.score, th, table.strict, table.paper)
        test_d = evaluate(traces["test"], method.score, th, table.strict, table.paper)
        points.append(_point("method_default", 0, cal_d, test_d, feasible=True, chosen_on="hyper-parameter"))

    latency: list[dict] = []
    headline = points[0]
    if ev.latency and headline.get("feasible"):
        thr = headline["threshold"]
        policy = (ThresholdPolicy(method.score, tuple(float(t) for t in thr)) if isinstance(thr, list)
                  else ThresholdPolicy.shared(method.score, float(thr), len(exits)))
        latency = measure_latency(backbone, net, policy, test_x, table.strict, batch_sizes=ev.latency_batch_sizes,
                                  repeats=ev.latency_repeats, threads=ev.threads)
        headline["latency"] = True

    risk = None
    if cell.risk_control.enabled:  # offline, on the traces: seconds, not network passes
        rc = cell.risk_control
        risk = run_protocol(traces["calibration"], traces["test"], table.strict,
                            score="confidence" if method.score == "confidence" else "max_softmax",
                            rules=rc.rules, risks=rc.risks, eps=rc.eps, delta=rc.delta, n_cal=rc.n_cal or None,
                            trials=rc.trials, seed=cell.seed)

    test_preds = traces["test"].predictions()
    cal_preds = traces["calibration"].predictions()
    exit_rows = []
    for k in range(net.num_exits):
        early = k < len(exits)
        exit_rows.append({
            "name": exits[k].name if early else "final",
            "block_index": exits[k].index if early else len(backbone.blocks) - 1,
            "macs_cumulative": exits[k].macs_cumulative if early else backbone.macs,  # backbone prefix
            "head_macs": h_macs[k] if early else backbone.head_macs,
            "rel_macs_strict": table.strict[k], "rel_macs_paper": table.paper[k],
            "calibration_accuracy": (cal_preds[k] == cal_y).double().mean().item(),
            "test_accuracy": (test_preds[k] == test_y).double().mean().item(),
        })

    return {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "cell": cell.slug(),
        "config": {**cell.to_dict(), "method_version": method.version, "score": method.score,
                   "trains_backbone": method.trains_backbone},
        "env": env_fingerprint("cpu", ev.threads),
        "higher_is_better": HIGHER_IS_BETTER,
        "data": {"train": len(splits.train), "calibration": len(splits.calibration), "test": len(splits.test),
                 "num_classes": num_classes, "input_size": list(splits.info.input_size)},
        "backbone": {"name": cell.backbone, "test_accuracy": bb_test_acc, "calibration_accuracy": bb_cal_acc,
                     "macs": backbone.macs, "macs_counter": MACS_COUNTER, "blocks": len(backbone.blocks),
                     "small_stem": getattr(backbone, "small_stem", None), "training": backbone_stats},
        "exits": exit_rows,
        "training": train_stats,
        "sweep": {"score": method.score, "thresholds": [_finite(x) for x in grid.tolist()],
                  "note": "thresholds from calibration-score quantiles; metrics on each split",
                  "test": _sweep_dict(test_sweep), "calibration": _sweep_dict(cal_sweep)},
        "operating_points": points,
        "latency": latency,
        **({"risk_control": risk} if risk is not None else {}),
        "traces": {s: f"traces/{cell.slug()}.{s}.safetensors" for s in traces},
        "seconds": time.perf_counter() - start,
    }


def _finite(x: float) -> float | str:
    return "inf" if x == float("inf") else x


def _sweep_dict(s: Sweep) -> dict:
    return {"accuracy": s.accuracy.tolist(), "agreement": s.agreement.tolist(),
            "rel_macs_strict": s.rel_macs_strict.tolist(), "rel_macs_paper": s.rel_macs_paper.tolist(),
            "exit_fractions": s.exit_fractions.tolist()}


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.slug()}.json"


def run_matrix(cells: list[Cell], out_dir: Path, cache_dir: Path, *, download: bool = False,
               progress: bool = True) -> dict[str, int]:
    """Run every cell not already done; an error in one cell is recorded there and the rest go on.

    Cells whose JSON exists with status ``ok`` or ``skipped`` are not run again; errors are retried.
    """
    counts = {"ok": 0, "error": 0, "skipped": 0, "reused": 0}
    memo: dict = {}
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress)
    for cell in bar:
        path = cell_path(out_dir, cell)
        bar.set_postfix_str(f"{cell.backbone} {cell.method}")
        if path.exists():
            try:
                if read_result(path).get("status") in ("ok", "skipped"):
                    counts["reused"] += 1
                    continue
            except (OSError, json.JSONDecodeError):
                pass  # a damaged file is recomputed
        try:
            result = run_cell(cell, out_dir, cache_dir, download=download, memo=memo)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded in the cell's JSON; the other cells still run
            msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            result = {"schema_version": SCHEMA_VERSION, "status": "error", "cell": cell.slug(), "error": msg,
                      "traceback": traceback.format_exc(limit=8), "config": cell.to_dict(),
                      "env": env_fingerprint("cpu", cell.evaluation.threads)}
            tqdm.write(f"error in {cell.slug()}: {msg}")
        write_json_atomic(path, result)
        counts[result["status"]] += 1
    return counts


def preflight(cells: list[Cell], *, download: bool = False) -> None:
    """Catch what would fail in every cell before running any: missing dataset files, backbones
    that cannot be cut, impossible exit placements. Raises UserError naming the field."""
    memo: dict = {}
    built: dict[tuple, StagedBackbone] = {}
    for cell in cells:
        splits = _splits(cell, download, memo)
        key = (cell.backbone, cell.small_stem, splits.info.num_classes, tuple(splits.info.input_size))
        if key not in built:
            built[key] = make_backbone(cell, splits, weights=False)
        method = get_method(cell.method)(**cell.hparams)
        try:
            method.place_exits(built[key])
        except UserError as e:
            raise UserError(f"{cell.where}.hparams: {e}") from None

