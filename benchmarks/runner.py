"""Run one cell into a result, and a whole matrix into a results directory.

A cell: load the splits, prepare the backbone (pretrained, a file, or trained here and cached), let
the method place exits, build and fit its net, record one trace per split, sweep the threshold grid
on the traces, pick operating points on calibration and report them on test, and time the real
dynamic forward against the backbone, and run the risk-control protocol. Each cell's JSON, traces
and trained weights are written atomically. A rerun reuses finished cells, re-analyses (from stored
traces and weights, training nothing) those whose evaluation-only settings changed, and retries errors.
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

from exitbench.benchmarks import backbones as bb
from exitbench.benchmarks.config import Cell
from exitbench.benchmarks.data import Splits, load_splits, make_loader, to_tensors
from exitbench.benchmarks.flops import MACS_COUNTER, cost_table, head_macs
from exitbench.benchmarks.latency import measure_latency, num_threads
from exitbench.benchmarks.risk_protocol import run_protocol
from exitbench.benchmarks.traces import Sweep, Trace, collect_trace, evaluate, threshold_grid
from exitbench.benchmarks.training import method_trainer, predict_logits, train_backbone
from exitbench.methods.base import StagedBackbone, UserError, get_method
from exitbench.methods.calibration import coordinate_descent
from exitbench.methods.policies import ThresholdPolicy
from exitbench.results import (
    HIGHER_IS_BETTER,
    SCHEMA_VERSION,
    env_fingerprint,
    read_result,
    remove_orphans,
    setting_id,
    write_atomic,
    write_json_atomic,
    write_manifest,
)

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
    bb.save_weights(backbone, path)  # atomic: a crash never leaves a half-written cache entry
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


def _save_net(net: torch.nn.Module, path: Path) -> None:
    """The trained multi-exit net's weights (safetensors; shared tensors stored once; atomic)."""
    from safetensors.torch import save_model

    write_atomic(path, lambda tmp: save_model(net, str(tmp)))


def _load_net(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(net, str(path), strict=True)  # safetensors: no pickle, nothing executed


def _files(out_dir: Path, cell: Cell) -> dict[str, Path]:
    slug = cell.slug()
    return {"calibration": out_dir / "traces" / f"{slug}.calibration.safetensors",
            "test": out_dir / "traces" / f"{slug}.test.safetensors",
            "weights": out_dir / "weights" / f"{slug}.safetensors"}


def _policy(method, point: dict, n_exits: int) -> ThresholdPolicy:
    thr = point["threshold"]
    return (ThresholdPolicy(method.score, tuple(float(t) for t in thr)) if isinstance(thr, list)
            else ThresholdPolicy.shared(method.score, float(thr), n_exits))


# ---------------------------------------------------------------------------------------------- stages
# A cell runs as named stages: data -> backbone -> fit -> traces + weights -> operating points ->
# latency -> risk control -> result. The first four are keyed by Cell.key(); each later one by its own
# analysis key, so a rerun after an evaluation-only change recomputes only the stages whose key changed.


def stage_points(cell: Cell, method, traces: dict[str, Trace], strict: list[float], paper: list[float],
                 bb_cal_acc: float) -> dict:
    """Threshold sweep on both splits and the operating points, chosen on calibration, reported on test."""
    ev = cell.evaluation
    grid = threshold_grid(traces["calibration"], method.score, ev.grid_size)
    cal_sweep = evaluate(traces["calibration"], method.score, grid, strict, paper)
    test_sweep = evaluate(traces["test"], method.score, grid, strict, paper)
    points = operating_points(cal_sweep, test_sweep, bb_cal_acc, ev.accuracy_drop)
    if method.per_exit_thresholds:  # the method's own kind of operating point leads (latency is timed there)
        points.insert(0, per_exit_point(traces["calibration"], traces["test"], method.score, strict, paper,
                                        bb_cal_acc, ev.accuracy_drop))
    default = method.default_thresholds()
    if default is not None:
        th = torch.tensor([default], dtype=torch.float64)
        # the methods' own rule is "exit when h > tau" (strict), as their help says
        cal_d = evaluate(traces["calibration"], method.score, th, strict, paper, exit_strict=True)
        test_d = evaluate(traces["test"], method.score, th, strict, paper, exit_strict=True)
        points.append(_point("method_default", 0, cal_d, test_d, feasible=True, chosen_on="hyper-parameter"))
    sweep = {"score": method.score, "thresholds": [_finite(x) for x in grid.tolist()],
             "note": "thresholds from calibration-score quantiles; metrics on each split",
             "test": _sweep_dict(test_sweep), "calibration": _sweep_dict(cal_sweep)}
    return {"sweep": sweep, "operating_points": points}


def stage_latency(cell: Cell, method, backbone, net, points: list[dict], test_x: torch.Tensor,
                  strict: list[float]) -> list[dict]:
    """The real dynamic forward against the backbone at the headline operating point."""
    ev = cell.evaluation
    headline = points[0]
    if not (ev.latency and headline.get("feasible")):
        return []
    headline["latency"] = True
    return measure_latency(backbone, net, _policy(method, headline, net.num_exits - 1), test_x, strict,
                           batch_sizes=ev.latency_batch_sizes, repeats=ev.latency_repeats, threads=ev.threads)


def stage_risk(cell: Cell, method, traces: dict[str, Trace], strict: list[float], seed: int) -> dict | None:
    """The risk-control protocol, offline on the traces: seconds, not network passes."""
    rc = cell.risk_control
    if not rc.enabled:
        return None
    return run_protocol(traces["calibration"], traces["test"], strict,
                        score="confidence" if method.score == "confidence" else "max_softmax",
                        rules=rc.rules, risks=rc.risks, eps=rc.eps, delta=rc.delta, n_cal=rc.n_cal or None,
                        trials=rc.trials, seed=seed)


def _rebuild(cell: Cell, splits: Splits, method, weights: Path):
    """The reference backbone (architecture only: timing does not depend on its weights) and the
    trained net from its saved weights. Nothing is trained."""
    torch.manual_seed(cell.seed)
    backbone = make_backbone(cell, splits, weights=False)
    backbone.eval()
    exits = method.place_exits(backbone)
    net = method.build(copy.deepcopy(backbone), exits, splits.info.num_classes)
    _load_net(net, weights)
    net.eval()
    return backbone, net


def reanalyse(cell: Cell, previous: dict, out_dir: Path, *, download: bool = False,
              memo: dict | None = None) -> tuple[dict, list[str]]:
    """Recompute the evaluation stages of a finished cell whose analysis keys changed, from its stored
    traces and weights; returns the new result and the names of the stages recomputed."""
    start = time.perf_counter()
    with num_threads(cell.evaluation.threads):
        keys, old = cell.analysis_keys(), previous.get("analysis") or {}
        files = _files(out_dir, cell)
        traces = {s: Trace.load(files[s]) for s in ("calibration", "test")}
        strict = [x["rel_macs_strict"] for x in previous["exits"]]
        paper = [x["rel_macs_paper"] for x in previous["exits"]]
        method = get_method(cell.method)(**cell.hparams)
        result = copy.deepcopy(previous)
        redo = [k for k in ("points", "latency", "risk_control") if keys[k] != old.get(k)]
        if "points" in redo:
            result.update(stage_points(cell, method, traces, strict, paper,
                                       previous["backbone"]["calibration_accuracy"]))
            redo = list(dict.fromkeys([*redo, "latency"]))  # latency is timed at the headline point
        if "latency" in redo:
            for p in result["operating_points"]:
                p.pop("latency", None)
            result["latency"] = []
            if cell.evaluation.latency and result["operating_points"][0].get("feasible"):
                splits = _splits(cell, download, {} if memo is None else memo)
                backbone, net = _rebuild(cell, splits, method, files["weights"])
                result["latency"] = stage_latency(cell, method, backbone, net, result["operating_points"],
                                                  to_tensors(splits.test)[0], strict)
        if "risk_control" in redo:
            risk = stage_risk(cell, method, traces, strict, cell.seed)
            result.pop("risk_control", None)
            if risk is not None:
                result["risk_control"] = risk
        result["config"] = {**previous["config"], **cell.to_dict()}
        result["analysis"] = keys
        result["env_analysis"] = env_fingerprint("cpu", cell.evaluation.threads)
        result["reanalysed"] = {"stages": redo, "seconds": time.perf_counter() - start, "finished": _now()}
    return result, redo


def run_cell(cell: Cell, out_dir: Path, cache_dir: Path, *, download: bool = False, memo: dict | None = None) -> dict:
    """Run one cell from scratch and return its result dict (status ``ok``); raises on failure."""
    with num_threads(cell.evaluation.threads):
        return _run_cell(cell, out_dir, cache_dir, download, memo)


def _run_cell(cell: Cell, out_dir: Path, cache_dir: Path, download: bool, memo: dict | None) -> dict:
    ev = cell.evaluation
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
    files = _files(out_dir, cell)
    for split, tr in traces.items():
        write_atomic(files[split], tr.save)
    _save_net(net, files["weights"])

    analysed = stage_points(cell, method, traces, table.strict, table.paper, bb_cal_acc)
    latency = stage_latency(cell, method, backbone, net, analysed["operating_points"], test_x, table.strict)
    risk = stage_risk(cell, method, traces, table.strict, cell.seed)

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

    config = {**cell.to_dict(), "method_version": method.version, "score": method.score,
              "trains_backbone": method.trains_backbone}
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "cell": cell.slug(),
        "setting_id": setting_id(config),
        "config": config,
        "analysis": cell.analysis_keys(),
        "env": env_fingerprint("cpu", ev.threads),
        "higher_is_better": HIGHER_IS_BETTER,
        "data": {"train": len(splits.train), "calibration": len(splits.calibration), "test": len(splits.test),
                 "num_classes": num_classes, "input_size": list(splits.info.input_size)},
        "backbone": {"name": cell.backbone, "test_accuracy": bb_test_acc, "calibration_accuracy": bb_cal_acc,
                     "macs": backbone.macs, "macs_counter": MACS_COUNTER, "blocks": len(backbone.blocks),
                     "small_stem": getattr(backbone, "small_stem", None), "training": backbone_stats},
        "exits": exit_rows,
        "training": train_stats,
        **analysed,
        "latency": latency,
        **({"risk_control": risk} if risk is not None else {}),
        "traces": {s: f"traces/{cell.slug()}.{s}.safetensors" for s in traces},
        "weights": f"weights/{cell.slug()}.safetensors",
        "seconds": time.perf_counter() - start,
        "finished": _now(),
    }


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite(x: float) -> float | str:
    return "inf" if x == float("inf") else x


def _sweep_dict(s: Sweep) -> dict:
    return {"accuracy": s.accuracy.tolist(), "agreement": s.agreement.tolist(),
            "rel_macs_strict": s.rel_macs_strict.tolist(), "rel_macs_paper": s.rel_macs_paper.tolist(),
            "exit_fractions": s.exit_fractions.tolist()}


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.slug()}.json"


def existing(path: Path) -> dict | None:
    """The stored result at ``path``, or None when there is none or it is unreadable (recomputed)."""
    try:
        r = read_result(path)
    except (OSError, json.JSONDecodeError):
        return None
    return r if isinstance(r, dict) and "status" in r else None


def _reusable(previous: dict | None, cell: Cell, out_dir: Path) -> str:
    """'reuse', 'reanalyse' or 'run' for a cell given its stored result."""
    if previous is None or previous.get("status") not in ("ok", "skipped"):
        return "run"
    if previous["status"] == "skipped":
        return "reuse"
    if previous.get("schema_version") != SCHEMA_VERSION or not all(p.exists() for p in _files(out_dir, cell).values()):
        return "run"  # from an older exitbench, or its traces/weights are gone: recompute from scratch
    return "reuse" if previous.get("analysis") == cell.analysis_keys() else "reanalyse"


def run_matrix(cells: list[Cell], out_dir: Path, cache_dir: Path, *, download: bool = False,
               progress: bool = True, matrix: str = "matrix") -> dict[str, int]:
    """Run every cell not already done; an error in one cell is recorded there and the rest go on.

    A cell whose result exists with status ``ok`` and the same analysis keys is reused; one whose
    evaluation settings changed is re-analysed from its traces and weights (nothing is trained);
    errors are retried. The directory's manifest records the cells of this run.
    """
    counts = {"ok": 0, "error": 0, "skipped": 0, "reused": 0, "reanalysed": 0}
    for folder in ("cells", "traces", "weights"):
        remove_orphans(out_dir / folder)
    remove_orphans(cache_dir)
    write_manifest(out_dir, matrix, [c.slug() for c in cells])
    memo: dict = {}
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress)
    for cell in bar:
        path = cell_path(out_dir, cell)
        bar.set_postfix_str(f"{cell.backbone} {cell.method}")
        previous = existing(path)
        todo = _reusable(previous, cell, out_dir)
        if todo == "reuse":
            counts["reused"] += 1
            tqdm.write(f"reused {cell.slug()}")
            continue
        try:
            if todo == "reanalyse":
                result, stages = reanalyse(cell, previous, out_dir, download=download, memo=memo)
                tqdm.write(f"re-analysed {cell.slug()} ({', '.join(stages)}) in {result['reanalysed']['seconds']:.1f} s"
                           ", nothing trained")
            else:
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
        counts["reanalysed" if todo == "reanalyse" and result["status"] == "ok" else result["status"]] += 1
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

