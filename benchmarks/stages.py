"""A cell as named stages: prepare data -> prepare backbone -> fit method -> record traces (+ save
weights) -> evaluate operating points -> time latency -> control risk -> assemble the result.

Each stage is a function with typed inputs and outputs and can be run (and tested) alone. The first
four are keyed by ``Cell.key()``; the last three each by their own analysis key
(``Cell.analysis_keys()``), so a re-analysis re-runs only the stages downstream of what changed, from
the stored traces and weights (:func:`exitbench.benchmarks.runner.reanalyse`). Every threshold is chosen
by ``exitbench.methods.calibration``; this module only evaluates the choices on both splits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from exitbench.benchmarks import accounting
from exitbench.benchmarks import backbones as bb
from exitbench.benchmarks.config import SPLIT_OPTIONS, build_method
from exitbench.benchmarks.data import DatasetInfo, Splits, dataset_info, load_splits, make_loader, to_tensors
from exitbench.benchmarks.device import DTYPES, check_dtype, in_dtype
from exitbench.benchmarks.env import env_fingerprint
from exitbench.benchmarks.fast import check_fast
from exitbench.benchmarks.flops import MACS_COUNTER, CostTable, cost_table, exit_head_macs
from exitbench.benchmarks.latency import TimingProtocol, measure_latency
from exitbench.benchmarks.risk_protocol import run_protocol
from exitbench.benchmarks.traces import Sweep, Trace, collect_trace, evaluate, stage_features
from exitbench.benchmarks.training import method_trainer, predict_logits, resumable, train_backbone
from exitbench.core.claims import DEFAULT_STALE_AFTER, wait_for
from exitbench.core.results import (
    HIGHER_IS_BETTER,
    SCHEMA_VERSION,
    BackboneResult,
    CellResult,
    ExitRow,
    LatencyRecord,
    Metrics,
    OperatingPoint,
    PredictedLatency,
    RiskControlResult,
    TemperatureResult,
    ThresholdSweep,
)
from exitbench.core.spec import Cell
from exitbench.core.store import read_json, safetensors_problem, write_atomic, write_json_atomic
from exitbench.methods import calibration, temperature
from exitbench.methods.base import Method, MultiExitNet, StagedBackbone, UserError
from exitbench.methods.calibration import Choice
from exitbench.methods.policies import make_policy

BACKBONE_RECIPE_VERSION = "1"  # bump when train_backbone changes in a way that changes weights
SPLITS = ("calibration", "test")


# ------------------------------------------------------------------------------------ stage outputs

@dataclass
class Reference:
    """The prepared reference backbone and its accuracy on both splits (the target of every drop)."""

    backbone: StagedBackbone
    stats: dict
    calibration_accuracy: float
    test_accuracy: float
    key: str = ""  # its weights and the cell's splits: equal keys, equal backbone outputs (the run's memo key)


@dataclass
class Fitted:
    """The method's trained multi-exit net, its exits and their costs."""

    method: Method
    net: MultiExitNet
    exits: list
    head_macs: list[int]
    costs: CostTable
    training: dict


# ----------------------------------------------------------------------------------- 1. prepare data

@dataclass
class NoData:
    """Splits without data: the dataset's info only, which is all ``make_backbone`` and ``rebuild`` read
    (re-timing and planning build networks without loading a dataset)."""

    info: DatasetInfo


def without_data(cell: Cell) -> NoData:
    """The cell's dataset info, from its own options (not how it is split or where it lives)."""
    return NoData(dataset_info(cell.dataset, **{k: v for k, v in cell.dataset_options.items()
                                                 if k not in SPLIT_OPTIONS}))


def prepare_data(cell: Cell, download: bool = False, memo: dict | None = None) -> Splits:
    """The cell's three splits (memoised per dataset, seed and options across the cells of a run)."""
    memo = {} if memo is None else memo
    opts = dict(cell.dataset_options)
    dl = bool(opts.pop("download", False)) or download
    key = json.dumps([cell.dataset, cell.seed, opts], sort_keys=True, default=str)
    if key not in memo:
        memo[key] = load_splits(cell.dataset, seed=cell.seed, download=dl, **opts)
    return memo[key]


# ------------------------------------------------------------------------------- 2. prepare backbone

def make_backbone(cell: Cell, splits: Splits, *, weights: bool = True) -> StagedBackbone:
    """The cell's backbone with its weights file or pretrained weights (not the harness-trained ones)."""
    info = splits.info
    path = cell.weights if cell.weights not in ("train", "pretrained") else None
    return bb.create_backbone(cell.backbone, num_classes=info.num_classes, input_size=info.input_size,
                              small_stem=cell.small_stem, pretrained=weights and cell.weights == "pretrained",
                              weights=path if weights else None)


def _recipe(cell: Cell) -> dict:
    recipe = asdict(cell.backbone_training)
    if recipe.get("precision") == "fp32":  # fp32 was the only precision before it was a setting: same key as then
        recipe.pop("precision")
    return recipe


def backbone_cache_path(cell: Cell, backbone: StagedBackbone, cache_dir: Path) -> Path:
    """Where harness-trained weights live: keyed by everything that determines them."""
    from importlib.metadata import version
    determines = {
        "backbone": cell.backbone, "small_stem": getattr(backbone, "small_stem", None),
        "input_size": list(backbone.input_size), "num_classes": backbone.num_classes,
        "dataset": cell.dataset, "dataset_options": {k: v for k, v in cell.dataset_options.items()
                                                     if k not in ("root", "download")},
        "seed": cell.seed, "recipe": _recipe(cell), "recipe_version": BACKBONE_RECIPE_VERSION,
        "timm": version("timm"), "torch": version("torch").split("+")[0],
    }
    key = hashlib.sha256(json.dumps(determines, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{cell.dataset}__{cell.backbone}__seed{cell.seed}__{key}.safetensors"


def _weights(cell: Cell, splits: Splits, cache_dir: Path, device: torch.device, stale_after: float
             ) -> tuple[StagedBackbone, dict]:
    torch.manual_seed(cell.seed)  # the initial weights are part of what the seed determines
    backbone = make_backbone(cell, splits)
    if cell.weights != "train":
        return backbone.to(device), {"weights": cell.weights}
    path = backbone_cache_path(cell, backbone, cache_dir)
    stats_path = path.with_suffix(".json")
    # several runners may need this backbone at once: the first to claim it trains it, the others wait for
    # the cached weights (no two processes train or write one weights file)
    claim = wait_for(path.with_name(path.name + ".lock"), lambda: _cache_problem(path, stats_path) is None,
                     stale_after)
    if claim is None:
        bb.load_weights(backbone, path)
        return backbone.to(device), {"weights": "train", "cache": str(path), "cached": True, **read_json(stats_path)}
    with claim:
        if path.exists() or stats_path.exists():  # a damaged entry (a full disk, a copy cut short): rebuilt
            tqdm.write(f"rebuilding the cached backbone {path.name}: {_cache_problem(path, stats_path)}")
        return _train_and_cache(cell, splits, backbone, path, stats_path, device)


def _cache_problem(path: Path, stats_path: Path) -> str | None:
    """What is wrong with a cache entry (its weights file, then its stats), or None when it can be used."""
    why = safetensors_problem(path)
    if why:
        return f"weights {why}"
    try:
        return None if isinstance(read_json(stats_path), dict) else "stats are not a mapping"
    except FileNotFoundError:
        return "stats missing"
    except (OSError, ValueError) as e:
        return f"stats unreadable ({type(e).__name__})"


def _train_and_cache(cell: Cell, splits: Splits, backbone: StagedBackbone, path: Path, stats_path: Path,
                     device: torch.device) -> tuple[StagedBackbone, dict]:
    budget = cell.backbone_training
    backbone.to(device)
    loader = make_loader(splits.train, budget.batch_size, True, cell.seed, device=device)
    partial = path.with_name(path.stem + ".partial")  # epoch checkpoints: a preempted training resumes
    with resumable(partial):
        stats = {**train_backbone(backbone, {"train": loader}, budget), "device": str(device)}
    bb.save_weights(backbone, path)  # atomic: a crash never leaves a half-written cache entry
    write_json_atomic(stats_path, stats)
    shutil.rmtree(partial, ignore_errors=True)
    return backbone, {"weights": "train", "cache": str(path), "cached": False, **stats}


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


def prepare_backbone(cell: Cell, splits: Splits, cache_dir: Path, device: torch.device | None = None,
                     stale_after: float = DEFAULT_STALE_AFTER, memo: dict | None = None) -> Reference:
    """The reference backbone (pretrained, a file, or trained here on ``device`` and cached) in eval mode on
    ``device`` (default: the CPU), with its calibration and test accuracy. A backbone another runner is
    training is waited for (its claim must heartbeat within ``stale_after`` seconds, else it is taken over).
    The accuracies are memoised in ``memo`` (a run's, shared with :func:`prepare_data`) per weights and
    splits: every cell on one backbone and seed compares with the same numbers, computed once."""
    backbone, stats = _weights(cell, splits, cache_dir, device or torch.device("cpu"), stale_after)
    backbone.eval()
    memo = {} if memo is None else memo
    key = "reference:" + json.dumps([stats.get("cache") or [cell.backbone, cell.weights, cell.small_stem],
                                     cell.dataset, cell.seed, {k: v for k, v in cell.dataset_options.items()
                                                               if k not in ("root", "download")}], default=str)
    if key not in memo:
        (cal_x, cal_y), (test_x, test_y) = to_tensors(splits.calibration), to_tensors(splits.test)
        memo[key] = (_accuracy(predict_logits(backbone, cal_x), cal_y), _accuracy(predict_logits(backbone, test_x),
                                                                                  test_y))
    return Reference(backbone, stats, *memo[key], key=key)


# ------------------------------------------------------------------------------------ 3. fit method

def place(cell: Cell, method: Method, backbone: StagedBackbone) -> list:
    """The method's exit points on ``backbone``; an impossible placement names the cell's field."""
    try:
        return method.place_exits(backbone)
    except UserError as e:
        raise UserError(f"{cell.where}.hparams (on {cell.backbone}): {e}") from None


def fit_method(cell: Cell, splits: Splits, backbone: StagedBackbone, device: torch.device | None = None,
               partial: Path | None = None) -> Fitted:
    """Place the exits, build the multi-exit net (on a copy of the backbone when the method trains it),
    cost its exits, and train it on train (calibration only for early stopping); eval mode on return.
    ``partial``: the folder of its epoch checkpoints (:func:`partial_dir`), to resume a preempted training."""
    method = build_method(cell)
    exits = place(cell, method, backbone)
    torch.manual_seed(cell.seed)  # same head initialisation for the same cell
    start_from = backbone
    if cell.regime != "disjoint":  # training the backbone changes it: keep the reference intact
        start_from = make_backbone(cell, splits, weights=False) if cell.regime == "joint" else copy.deepcopy(backbone)
    net = method.build(start_from, exits, splits.info.num_classes)
    net.set_backbone_frozen(cell.regime == "disjoint")  # the regime decides, whatever the method's default
    h_macs = exit_head_macs(net, exits)
    costs = cost_table(backbone, exits, h_macs)
    net.rel_costs = torch.tensor(costs.paper, dtype=torch.float32)
    budget = method.budget()
    net.to(device or torch.device("cpu"))  # the reference backbone's modules go along where they are shared
    loaders = {"train": make_loader(splits.train, budget.batch_size, True, cell.seed, device=device),
               "calibration": make_loader(splits.calibration, budget.batch_size, False, cell.seed, device=device)}
    with resumable(partial) if partial else nullcontext():
        training = method.fit(net, loaders, budget, method_trainer)
    training["budget"] = {**training.get("budget", {}), "regime": cell.regime}  # what the budget bought, and how
    net.eval()
    return Fitted(method, net, exits, h_macs, costs, training)


def rebuild(cell: Cell, splits: Splits, method: Method, weights: Path, device: torch.device | None = None
            ) -> tuple[StagedBackbone, MultiExitNet]:
    """The reference backbone (architecture only: timing does not depend on its weights) and the trained
    net from its saved weights, in eval mode on ``device``. Nothing is trained."""
    from safetensors.torch import load_model

    torch.manual_seed(cell.seed)
    backbone = make_backbone(cell, splits, weights=False)
    backbone.eval()
    net = method.build(copy.deepcopy(backbone), place(cell, method, backbone), splits.info.num_classes)
    load_model(net, str(weights), strict=True)  # safetensors: no pickle, nothing executed
    device = device or torch.device("cpu")
    return backbone.to(device).eval(), net.to(device).eval()


# ---------------------------------------------------------------------------------- 4. record traces

def partial_dir(out_dir: Path, cell: Cell) -> Path:
    """Where a cell's training keeps its epoch checkpoints until the cell's result is written."""
    return out_dir / "partial" / cell.slug()


def artifact_paths(out_dir: Path, cell: Cell) -> dict[str, Path]:
    """Where a cell's traces and trained weights live under the results directory."""
    slug = cell.slug()
    return {"calibration": out_dir / "traces" / f"{slug}.calibration.safetensors",
            "test": out_dir / "traces" / f"{slug}.test.safetensors",
            "weights": out_dir / "weights" / f"{slug}.safetensors"}


def record_traces(net: MultiExitNet, splits: Splits, shared: tuple | None = None, memo: dict | None = None
                  ) -> dict[str, Trace]:
    """One ``forward_all`` pass per held-out split: every exit's logits (and confidences).

    ``shared``: the identity of a frozen backbone and its exits (:func:`frozen_identity`); every net with
    the same identity computes the same stage outputs, so they are computed once per run and kept in
    ``memo`` (the latest identity only: a backbone's held-out features are hundreds of MB), and each such
    net runs only its exits on them. The traces are the same tensors either way (a test checks)."""
    memo = {} if memo is None else memo
    out = {}
    for s in SPLITS:
        x, y = to_tensors(getattr(splits, s))
        feats = None
        if shared is not None:
            key = ("features", shared, s)
            if key not in memo:
                for old in [k for k in memo if k[0] == "features" and k[1] != shared]:
                    del memo[old]
                memo[key] = stage_features(net, x)
            feats = memo[key]
        out[s] = collect_trace(net, x, y, features=feats)
    return out


def frozen_identity(cell: Cell, ref: Reference, fitted: Fitted) -> tuple | None:
    """What determines a frozen backbone's stage outputs on the cell's splits (its weights, the data, the
    exits' blocks), or None when the backbone trains (each net then has its own)."""
    if not fitted.net.freeze_backbone or cell.regime != "disjoint":
        return None
    return (ref.key, tuple(e.index for e in fitted.exits), str(next(fitted.net.parameters()).device))


def save_artifacts(out_dir: Path, cell: Cell, traces: dict[str, Trace], net: MultiExitNet) -> None:
    """Traces and the trained net's weights (safetensors, shared tensors once), each written atomically."""
    from safetensors.torch import save_model

    files = artifact_paths(out_dir, cell)
    for split, tr in traces.items():
        write_atomic(files[split], tr.save)
    write_atomic(files["weights"], lambda tmp: save_model(net, str(tmp)))


def load_traces(out_dir: Path, cell: Cell) -> dict[str, Trace]:
    files = artifact_paths(out_dir, cell)
    return {s: Trace.load(files[s]) for s in SPLITS}


# ------------------------------------------------------------------------- 5. evaluate operating points

TEMPERATURE_FIT_FRACTION = 0.5  # the seeded share of calibration that fits the temperatures
ECE_BINS = 15


def scale_traces(cell: Cell, traces: dict[str, Trace]) -> tuple[dict[str, Trace], TemperatureResult | None]:
    """With ``evaluation.temperature: per-exit``: one temperature per exit fitted (NLL) on a seeded
    ``TEMPERATURE_FIT_FRACTION`` of calibration, and both splits' traces scaled by them; each exit's ECE
    before and after on the rest of calibration and on test. The thresholds are then chosen on the
    whole (scaled) calibration split; test is never seen. Otherwise the traces unchanged and None."""
    if cell.evaluation.temperature == "none":
        return traces, None
    cal = traces["calibration"]
    perm = torch.randperm(len(cal), generator=torch.Generator().manual_seed(cell.seed))
    cut = max(1, int(round(len(cal) * TEMPERATURE_FIT_FRACTION)))
    fit, rest = perm[:cut], perm[cut:]
    temps = temperature.fit_temperatures(cal.logits[:, fit], cal.labels[fit])
    scaled = {s: traces[s].scaled(temps) for s in SPLITS}
    views = {"calibration_held_out": (cal.logits[:, rest], scaled["calibration"].logits[:, rest], cal.labels[rest]),
             "test": (traces["test"].logits, scaled["test"].logits, traces["test"].labels)}
    before = {k: [temperature.ece(lg, y, ECE_BINS) for lg in raw] for k, (raw, _, y) in views.items()}
    after = {k: [temperature.ece(lg, y, ECE_BINS) for lg in sc] for k, (_, sc, y) in views.items()}
    return scaled, TemperatureResult(temps, len(fit), len(rest), ECE_BINS, before, after)


def _metrics(s: Sweep) -> Metrics:
    return Metrics(s.accuracy[0].item(), s.agreement[0].item(), s.rel_macs_strict[0].item(),
                   s.rel_macs_paper[0].item(), s.exit_fractions[0].tolist())


def _point(kind: str, target: float | None, choice: Choice, score: str, traces: dict[str, Trace],
           costs: CostTable, *, search: str, strict: bool = False, chosen_on: str = "calibration") -> OperatingPoint:
    """An operating point from a calibration choice, evaluated on both splits."""
    if not choice.feasible:
        return OperatingPoint(kind, target, False, score, search=search, reason=choice.reason)
    th = torch.tensor([choice.thresholds], dtype=torch.float64)
    on = {s: _metrics(evaluate(traces[s], score, th, costs.strict, costs.paper, exit_strict=strict)) for s in SPLITS}
    temps = traces["calibration"].temperatures  # the scores were temperature-scaled: deploy with them
    return OperatingPoint(kind, target, True, score, list(choice.thresholds), on["calibration"], on["test"],
                          chosen_on=chosen_on, search=search, strict=strict,
                          temperatures=None if temps is None or score == "patience" else temps[:-1])


def evaluate_points(cell: Cell, method: Method, traces: dict[str, Trace], costs: CostTable,
                    reference_accuracy: float) -> tuple[ThresholdSweep, list[OperatingPoint]]:
    """The shared-threshold sweep on both splits, and every operating point, chosen on calibration by
    ``exitbench.methods.calibration`` (reference: the backbone's calibration accuracy) and reported on
    test. The headline is the method's own accuracy-drop point (per exit for per-exit methods)."""
    ev, score, cal = cell.evaluation, method.score, traces["calibration"]
    grid = calibration.quantile_grid(cal.scores(score), ev.grid_size)
    sweeps = {s: evaluate(traces[s], score, grid, costs.strict, costs.paper) for s in SPLITS}
    drop, k = ev.accuracy_drop, cal.num_exits - 1
    points = [_point("accuracy_drop", drop, calibration.accuracy_drop(cal, score, costs.strict, drop, grid,
                                                                      reference_accuracy),
                     score, traces, costs, search="shared threshold, quantile grid")]
    if method.per_exit_thresholds:
        points.insert(0, _point("accuracy_drop_per_exit", drop, calibration.per_exit_accuracy_drop(
            cal, score, costs.strict, drop, reference=reference_accuracy), score, traces, costs,
            search="coordinate descent per exit"))
    points[0].headline = True
    points.append(_point("patience", drop, calibration.accuracy_drop(cal, "patience", costs.strict, drop,
                                                                     reference=reference_accuracy),
                         "patience", traces, costs, search="PABEE patience, shared"))
    for b in ev.budgets:
        points.append(_point("macs_budget", b, calibration.macs_budget(cal, score, costs.strict, b, grid),
                             score, traces, costs, search="shared threshold, quantile grid"))
    for b in ev.budgets:
        _, (choice,) = calibration.geometric_budget(cal, score, costs.strict, budget=b)
        points.append(_point("msdnet_budget", b, choice, score, traces, costs, search="MSDNet p sweep"))
    default = method.default_thresholds()
    if default is not None:  # the methods' own rule is "exit when h > tau" (strict), as their help says
        points.append(_point("method_default", None, Choice(True, (float(default),) * k), score, traces, costs,
                             search="hyper-parameter", strict=True, chosen_on="hyper-parameter"))
    sweep = ThresholdSweep(score, grid.tolist(), "thresholds from calibration-score quantiles; metrics on each split",
                           **{s: _sweep_lists(sweeps[s]) for s in SPLITS})
    return sweep, points


def _sweep_lists(s: Sweep) -> dict[str, list]:
    return {"accuracy": s.accuracy.tolist(), "agreement": s.agreement.tolist(),
            "rel_macs_strict": s.rel_macs_strict.tolist(), "rel_macs_paper": s.rel_macs_paper.tolist(),
            "exit_fractions": s.exit_fractions.tolist()}


# ------------------------------------------------------------------------------------ 6. time latency

@dataclass(frozen=True)
class Timing:
    """What the time-latency stage gives: the records, the operating points with the timed one marked
    (new values: the points passed in are left as they were), and what the timing left out and why."""

    records: list[LatencyRecord]
    points: list[OperatingPoint]
    notes: list[str]


def time_latency(protocol: TimingProtocol, backbone: StagedBackbone, net: MultiExitNet, points: list[OperatingPoint],
                 test_x: Tensor, strict_costs: list[float], trace: Trace | None = None) -> Timing:
    """The protocol's latency variants against the backbone at the headline point (marked ``timed`` in the
    returned points), on the device the net is on, in the protocol's dtype (other than float32: converted
    copies are timed, the trained networks are left untouched).
    ``trace``: the (scaled) test trace of ``test_x``; every exiting variant is then checked against its
    decisions under the same policy (the records count the samples that differ)."""
    head = next((p for p in points if p.headline), None)
    timed = protocol.enabled and head is not None and head.feasible
    points = [replace(p, timed=timed and p is head) for p in points]
    if not timed:
        return Timing([], points, [])
    policy = make_policy(head.score, head.thresholds, head.strict, head.temperatures)
    device = next(net.parameters()).device
    dtype = check_dtype(net, test_x, protocol.dtype, device)
    check_fast(protocol.fast, device)
    expected = None if trace is None else trace.decisions(head.score, head.thresholds, head.strict)
    measured = measure_latency(in_dtype(backbone, device, dtype), in_dtype(net, device, dtype), policy,
                               test_x.to(device, dtype), strict_costs, protocol, expected=expected)
    return Timing(measured.records, points, measured.notes)


def account_latency(cell: Cell, protocol: TimingProtocol, method: Method, net: MultiExitNet,
                    points: list[OperatingPoint], traces: dict[str, Trace], test_x: Tensor, costs: CostTable,
                    latency: list[LatencyRecord]) -> tuple[dict | None, list[OperatingPoint], list[LatencyRecord]]:
    """Latency accounting: the net's per-stage profile on its device, every point's predicted latency at
    each batch size the protocol times, the prediction beside each measured compaction record (at that
    record's own exit fractions, so the two compare like for like), and the ``latency_budget`` points (chosen
    on calibration with the per-exit batch-1 latency as the cost). Returns new values, its inputs unchanged:
    (the profile, or None when latency is off; the points; the records)."""
    points = [p for p in points if p.kind != "latency_budget"]  # recomputed with the profile
    if not protocol.enabled:
        return None, points, latency
    device = next(net.parameters()).device
    sizes = [b for _, b in protocol.sizes(device, len(test_x))]
    never = make_policy(method.score, [math.inf] * (net.num_exits - 1))  # times the gates, nobody leaves
    dtype = DTYPES[protocol.dtype]  # the dtype that was timed (checked there), so the two describe one network
    with torch.no_grad():
        prof = accounting.profile(in_dtype(net, device, dtype), test_x.to(device, dtype), sizes, gate=never)
    points += _latency_budget_points(cell, method.score, traces, costs, prof)
    points = [replace(p, predicted_latency=[PredictedLatency(**accounting.predict(prof, p.test.exit_fractions, b))
                                            for b in sizes]) if p.feasible and p.test is not None else p
              for p in points]
    latency = [replace(r, predicted_ratio=accounting.predict(prof, r.exit_fractions, r.batch_size)["predicted_ratio"])
               if r.variant == "compaction" and r.exit_fractions and r.device == str(device) else r for r in latency]
    return prof, points, latency


def _latency_budget_points(cell: Cell, score: str, traces: dict[str, Trace], costs: CostTable, prof: dict
                           ) -> list[OperatingPoint]:
    """One point per ``evaluation.latency_budgets``: chosen on calibration with the profiled batch-1 latency
    of each exit as its cost."""
    ev, cal = cell.evaluation, traces["calibration"]
    grid = calibration.quantile_grid(cal.scores(score), ev.grid_size)
    lat_costs = accounting.exit_costs_batch1(prof)
    return [_point("latency_budget", b, calibration.macs_budget(cal, score, lat_costs, b, grid), score, traces,
                   costs, search="shared threshold, quantile grid; cost: profiled latency at b=1")
            for b in ev.latency_budgets]


# ------------------------------------------------------------------------------------ 7. control risk

def control_risk(cell: Cell, method: Method, traces: dict[str, Trace], strict_costs: list[float]
                 ) -> RiskControlResult | None:
    """The risk-control protocol, offline on the traces: seconds, not network passes."""
    if not cell.risk_control.enabled:
        return None
    return run_protocol(traces["calibration"], traces["test"], strict_costs, cell.risk_control,
                        score="confidence" if method.score == "confidence" else "max_softmax", seed=cell.seed)


# ------------------------------------------------------------------------------------ 8. the result

def exit_rows(fitted: Fitted, backbone: StagedBackbone, traces: dict[str, Trace]) -> list[ExitRow]:
    """Where each exit sits, what it costs under both accountings, and its accuracy on both splits."""
    acc = {s: (traces[s].predictions() == traces[s].labels[None]).double().mean(1).tolist() for s in SPLITS}
    rows = []
    for k in range(fitted.net.num_exits):
        early = k < len(fitted.exits)
        e = fitted.exits[k] if early else None
        rows.append(ExitRow(e.name if early else "final", e.index if early else len(backbone.blocks) - 1,
                            e.macs_cumulative if early else backbone.macs,
                            fitted.head_macs[k] if early else backbone.head_macs,
                            fitted.costs.strict[k], fitted.costs.paper[k], acc["calibration"][k], acc["test"][k]))
    return rows


def assemble(cell: Cell, splits: Splits, ref: Reference, fitted: Fitted, traces: dict[str, Trace],
             sweep: ThresholdSweep, points: list[OperatingPoint], latency: list[LatencyRecord],
             risk: RiskControlResult | None, seconds: float, profile: dict | None = None,
             temperatures: TemperatureResult | None = None, latency_notes: list[str] | None = None) -> CellResult:
    """The cell's typed result (status ``ok``)."""
    m = fitted.method  # the result says what the method that ran says of itself
    config = replace(cell, method_version=m.version, score=m.score, method_regime=m.default_regime())
    return CellResult(
        **result_fields(cell, splits, ref, config, next(fitted.net.parameters()).device),
        exits=exit_rows(fitted, ref.backbone, traces), training=fitted.training, sweep=sweep,
        operating_points=points, latency=latency, latency_profile=profile, latency_notes=list(latency_notes or []),
        risk_control=risk, temperature=temperatures, seconds=seconds)


def result_fields(cell: Cell, splits: Splits, ref: Reference, config: Cell, device: torch.device) -> dict:
    """The fields every ok result has (early-exit or static): identity, keys, environment, data, the
    backbone's accuracy and MACs, where its traces and weights are, and when it finished."""
    b, slug = ref.backbone, cell.slug()
    return dict(
        status="ok", cell=slug, config=config, schema_version=SCHEMA_VERSION, setting_id=config.setting_id(),
        analysis=cell.analysis_keys(), env=env_fingerprint(device, cell.evaluation.threads, cell.evaluation.dtype),
        higher_is_better=dict(HIGHER_IS_BETTER),
        data={"train": len(splits.train), "calibration": len(splits.calibration), "test": len(splits.test),
              "num_classes": splits.info.num_classes, "input_size": list(splits.info.input_size)},
        backbone=BackboneResult(cell.backbone, ref.test_accuracy, ref.calibration_accuracy, b.macs, MACS_COUNTER,
                                len(b.blocks), getattr(b, "small_stem", None), ref.stats),
        traces={s: f"traces/{slug}.{s}.safetensors" for s in SPLITS}, weights=f"weights/{slug}.safetensors",
        finished=now())


def write_result(path: Path, result: CellResult) -> None:
    """The cell's JSON, atomically."""
    write_json_atomic(path, result.to_dict())


def now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def elapsed(start: float) -> float:
    return time.perf_counter() - start
