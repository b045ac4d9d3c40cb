"""The result contract: typed, versioned and torch-free, on exitbench's ground floor.

The runner fills these types, every result file is one :class:`CellResult` written with ``to_dict``,
and reports and compare read results only through :func:`CellResult.from_dict` (``exitbench.reports.load``
is the one loader). Nothing is ever parsed back out of a name: an operating point carries its ``kind``
and ``target`` as values, the timed one says so (``timed``), a risk-control row says what its rule
promises (``promise``), and ``config`` is the typed :class:`~exitbench.core.spec.Cell` the result was
computed for. ``schema_version`` is checked on read: a newer one is refused; an older one is migrated on
read by the upgrade functions in ``UPGRADES`` (one per version step, so a user's stored results survive
an upgrade of exitbench); results of schema 2 and older are refused with what to do (``exitbench run``
recomputes them).

JSON cannot hold +inf, which is a real threshold ("never leave at this exit"); it is written as the
string ``"inf"`` and read back as a float. Every other non-finite float a result holds is written the same
way (``"-inf"``, ``"nan"``), so that a result is always valid JSON.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from exitbench.core.errors import UserError
from exitbench.core.spec import STATIC, Cell

# 3: typed operating points (kind, target, timed), budgets as points, risk rows' promise
# 4: ``config`` is the typed Cell: ``regime`` and ``method_regime`` always, ``init`` and ``trains_backbone``
#    derived from the regime (no longer stored)
SCHEMA_VERSION = 4

# Direction of every metric in the schema (lm-evaluation-harness style): comparisons and reports
# read it instead of guessing.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "agreement": True,
    "test_accuracy": True,
    "rel_macs_strict": False,
    "rel_macs_paper": False,
    "median_ms": False,
    "iqr_ms": False,
    "latency_ratio": False,
    "realisation": True,
    "seconds_per_epoch": False,
}

# Operating-point kinds (shared vocabulary): how the thresholds were chosen, all on calibration except
# ``method_default`` (the method's own hyper-parameter). ``target``: the accuracy drop or MACs budget.
POINT_KINDS: dict[str, str] = {
    "accuracy_drop": "cheapest shared threshold (strict MACs) within `target` of the backbone's accuracy",
    "accuracy_drop_per_exit": "per-exit thresholds (coordinate descent), cheapest within `target` of the backbone",
    "patience": "PABEE patience: the cheapest patience within `target` of the backbone's accuracy",
    "macs_budget": "most accurate shared threshold whose expected strict MACs fit the budget `target`",
    "msdnet_budget": "MSDNet's geometric exit shares, the most accurate p whose strict MACs fit `target`",
    "latency_budget": "most accurate shared threshold whose predicted batch-1 latency fits `target` x the backbone's",
    "method_default": "the method's own inference threshold (a hyper-parameter, not calibrated)",
}


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # "inf", "-inf" or "nan": JSON has no such numbers


def _dec(x: Any) -> Any:
    return float(x) if x in ("inf", "-inf", "nan") else x


def _build(cls: type, d: dict, **nested: Any) -> Any:
    """``cls`` from dict ``d``: known fields only (unknown keys from newer minor writers are ignored),
    ``nested`` maps a field to its converter."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for k, conv in nested.items():
        if kw.get(k) is not None:
            kw[k] = conv(kw[k])
    return cls(**kw)


def _plain(obj: Any) -> Any:
    """A dataclass tree as JSON-ready dicts, without None-valued optional fields."""
    if hasattr(obj, "__dataclass_fields__"):
        out = {}
        for f in fields(obj):
            if f.metadata.get("runtime"):
                continue
            v = getattr(obj, f.name)
            if v is None and f.default is None:
                continue
            out[f.name] = _plain(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return _enc(obj)
    return obj


@dataclass
class Metrics:
    """One split's numbers at an operating point."""

    accuracy: float | None
    agreement: float | None
    rel_macs_strict: float | None
    rel_macs_paper: float | None
    exit_fractions: list[float] = field(default_factory=list)


@dataclass
class PredictedLatency:
    """An operating point's latency predicted from the cell's per-stage profile and its test exit fractions
    (``estimate`` says so: a model of the time, not a measurement)."""

    batch_size: int
    predicted_ms: float
    predicted_ratio: float | None
    estimate: str


@dataclass
class OperatingPoint:
    """Thresholds chosen one way (``kind``, for ``target``) on calibration and reported on both splits.

    ``thresholds``: one per early exit (a shared threshold repeated), on ``score``; None when no setting
    met the target on calibration (``feasible`` False, ``reason`` says why). ``headline``: the point the
    tables and figures lead with (the method's accuracy-drop point); ``timed``: latency was measured here.
    """

    kind: str
    target: float | None
    feasible: bool
    score: str
    thresholds: list[float] | None = None
    calibration: Metrics | None = None
    test: Metrics | None = None
    strict: bool = False  # leave when score > threshold (the methods' own tau rule) instead of >=
    chosen_on: str = "calibration"
    search: str | None = None
    headline: bool = False
    timed: bool = False
    reason: str | None = None
    predicted_latency: list[PredictedLatency] | None = None
    temperatures: list[float] | None = None  # per early exit, when chosen on temperature-scaled scores

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return _build(cls, d, thresholds=lambda t: [_dec(x) for x in t],
                      calibration=lambda m: _build(Metrics, m), test=lambda m: _build(Metrics, m),
                      predicted_latency=lambda ps: [_build(PredictedLatency, p) for p in ps])


@dataclass
class TemperatureResult:
    """Per-exit temperature scaling (``evaluation.temperature``): the temperatures (every exit, final
    last), fitted on ``fitted_on`` calibration samples, and each exit's ECE (``bins`` bins) before and
    after scaling on the rest of calibration (``held_out``) and on test."""

    temperatures: list[float]
    fitted_on: int
    held_out: int
    bins: int
    ece_before: dict[str, list[float]]  # split -> per exit
    ece_after: dict[str, list[float]]


@dataclass
class LatencyRecord:
    """One timed variant at one batch size (docs/measurement.md). Variants that exit early carry the
    exit fractions on the timed inputs, the strict MACs ratio they imply, the paired latency ratio
    against ``backbone`` and the realisation."""

    variant: str
    batch_size: int
    device: str
    median_ms: float
    iqr_ms: float
    p90_ms: float
    repeats: int
    noisy: bool
    n_batches: int | None = None
    samples: int | None = None
    dtype: str | None = None
    threads: int | None = None
    warmup: int | None = None
    timer: str | None = None  # "cuda events" on a GPU, "perf_counter" between synchronisations elsewhere
    simulation: bool = False  # a reference (full+select, per-stage-ideal), not a deployable execution
    latency_ratio: float | None = None
    ratio_of: str | None = None
    macs_ratio_strict: float | None = None
    realisation: float | None = None
    realisation_note: str | None = None
    exit_fractions: list[float] | None = None
    same_as_compaction: bool | None = None  # records stored before the counts below: predictions equal compaction's
    inputs: str | None = None  # what was timed: the test split, or same-shaped random tensors (exitbench time)
    predicted_ratio: float | None = None  # compaction: the per-stage profile's prediction at these exit fractions
    fast: str | None = None  # the fast path's variants: compile | graphs
    buckets: list[int] | None = None  # the fast path's bucket sizes (surviving batches pad up to the next)
    # what latency_ratio is against: a static baseline's backbone, or the fast path's backbone-compile/-graphs
    against: str | None = None
    latency_ratio_eager: float | None = None  # the fast path against the eager backbone (latency_ratio: the fast one)
    requested_batch_size: int | None = None  # the size asked for, when the split had fewer images (batch_size: timed)
    host_read: str | None = None  # how each timed request ended ("predictions per request")
    cudnn_benchmark: bool | None = None  # CUDA: cuDNN's shape autotuning in the timed region (off)
    # the timed samples compared with the offline trace under the same policy, and how many differ
    checked: int | None = None
    differ_predictions: int | None = None
    differ_exits: int | None = None

    @property
    def differ_share(self) -> float | None:
        """The share of checked samples whose prediction or exit differ from the trace's (the larger)."""
        if not self.checked:
            return None
        return max(self.differ_predictions or 0, self.differ_exits or 0) / self.checked


@dataclass
class RiskRow:
    """One (rule, risk, eps) of the risk-control protocol, summarised over trials. ``promise``:
    ``expectation``, ``high-probability`` or ``none`` -- what the harness checks the row against."""

    rule: str
    risk: str
    eps: float
    guarantee: str
    promise: str
    test_risk_mean: float
    test_risk_std: float
    violation_freq: float
    mean_exit_index: float
    rel_macs_strict_mean: float
    lambda_mean: float | None = None


@dataclass
class RiskControlResult:
    """The risk-control protocol of one cell (docs/risk_control.md); rows in registry order."""

    score: str
    delta: float
    n_cal: int
    population: int
    trials: int
    sampling: str
    allowance: float
    seconds: float
    rows: list[RiskRow] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> RiskControlResult:
        return _build(cls, d, rows=lambda rs: [_build(RiskRow, r) for r in rs])


@dataclass
class ExitRow:
    """One exit: where it sits, what it costs (relative to the backbone, both accountings), its accuracy."""

    name: str
    block_index: int
    macs_cumulative: int
    head_macs: int
    rel_macs_strict: float
    rel_macs_paper: float
    calibration_accuracy: float
    test_accuracy: float


@dataclass
class BackboneResult:
    """The reference backbone of a cell: its accuracy on both splits and its MACs."""

    name: str
    test_accuracy: float
    calibration_accuracy: float
    macs: int
    macs_counter: str
    blocks: int
    small_stem: bool | None = None
    training: dict = field(default_factory=dict)


@dataclass
class ThresholdSweep:
    """Every threshold of the shared grid on both splits: lists aligned with ``thresholds``."""

    score: str
    thresholds: list[float]
    note: str
    calibration: dict[str, list]
    test: dict[str, list]

    @classmethod
    def from_dict(cls, d: dict) -> ThresholdSweep:
        return _build(cls, d, thresholds=lambda t: [_dec(x) for x in t])


@dataclass
class CellResult:
    """One cell's result file. ``status`` is ``ok`` or ``error`` (then ``error`` and ``traceback`` say why).

    ``path``, ``mtime`` and ``label`` are filled by the loader (where the file was, when it was written,
    a short setting label unique among the loaded results) and never written.
    """

    status: str
    cell: str
    config: Cell
    schema_version: int = SCHEMA_VERSION
    setting_id: str | None = None
    analysis: dict | None = None
    env: dict | None = None
    higher_is_better: dict | None = None
    data: dict | None = None
    backbone: BackboneResult | None = None
    exits: list[ExitRow] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    sweep: ThresholdSweep | None = None
    operating_points: list[OperatingPoint] = field(default_factory=list)
    latency: list[LatencyRecord] = field(default_factory=list)
    latency_profile: dict | None = None  # per-stage and per-head times at a few batch sizes (accounting)
    latency_notes: list[str] = field(default_factory=list)  # what the timing left out and why (a fast path OOM)
    risk_control: RiskControlResult | None = None
    temperature: TemperatureResult | None = None
    traces: dict | None = None
    weights: str | None = None
    seconds: float | None = None
    finished: str | None = None
    reanalysed: dict | None = None
    reanalysis_error: dict | None = None  # the last re-analysis failed (error, traceback, finished): result kept
    env_analysis: dict | None = None
    error: str | None = None
    traceback: str | None = None
    path: str | None = field(default=None, metadata={"runtime": True})
    mtime: float | None = field(default=None, metadata={"runtime": True})
    label: str | None = field(default=None, metadata={"runtime": True})

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "result") -> CellResult:
        """Read a stored result, migrating an older schema (``UPGRADES``); refuses a newer one, or one too old
        to migrate, with a one-line :class:`UserError`."""
        d = upgrade(d, where)
        return _build(cls, d, config=lambda c: _cell(c, where), backbone=lambda b: _build(BackboneResult, b),
                      exits=lambda es: [_build(ExitRow, e) for e in es], sweep=ThresholdSweep.from_dict,
                      operating_points=lambda ps: [OperatingPoint.from_dict(p) for p in ps],
                      latency=lambda ls: [_build(LatencyRecord, x) for x in ls],
                      risk_control=RiskControlResult.from_dict,
                      temperature=lambda t: _build(TemperatureResult, t))

    # ------------------------------------------------------------------ reading

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def static(self) -> bool:
        """A static baseline (a plain model, no exits), not an early-exit cell."""
        return self.config.static

    def point(self, kind: str, target: float | None = None) -> OperatingPoint | None:
        """The operating point of ``kind`` (and ``target``, when given), or None."""
        for p in self.operating_points:
            if p.kind == kind and (target is None or (p.target is not None and abs(p.target - target) < 1e-12)):
                return p
        return None

    def headline(self) -> OperatingPoint | None:
        """The point tables and figures lead with (the method's calibrated accuracy-drop point)."""
        return next((p for p in self.operating_points if p.headline), None)

    def latency_record(self, variant: str, batch_size: int) -> LatencyRecord | None:
        return next((x for x in self.latency if x.variant == variant and x.batch_size == batch_size), None)

    def latency_noisy(self, batch_size: int, variant: str = "compaction") -> bool:
        """Whether the backbone's or ``variant``'s record at ``batch_size`` is flagged noisy: their ratio is
        then not to be trusted."""
        return any(x.noisy for x in self.latency if x.batch_size == batch_size and x.variant in ("backbone", variant))


def _cell(config: Any, where: Any) -> Cell:
    """A stored ``config`` as the typed cell; a one-line UserError when it is not one."""
    try:
        return Cell.from_dict(config)
    except (TypeError, AttributeError) as e:  # a missing field, or not a mapping
        raise UserError(f"{where}: its config is not a cell specification ({e}); rerun `exitbench run` to "
                        "recompute it") from None


def check_schema(result: dict, where: Any, *, older_ok: bool = False) -> None:
    """Refuse a result this exitbench cannot read: a newer schema, or one older than ``UPGRADES`` migrates
    (with ``older_ok``, only a newer one), with a one-line :class:`UserError` saying what to do."""
    v = result.get("schema_version")
    if not isinstance(v, int):
        raise UserError(f"{where}: not an exitbench result (no schema_version)")
    if v > SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {v} is newer than this exitbench's ({SCHEMA_VERSION}); "
                        "upgrade exitbench, or use another results directory")
    if v < min(UPGRADES, default=SCHEMA_VERSION) and not older_ok:
        raise UserError(f"{where}: schema_version {v} is older than this exitbench's ({SCHEMA_VERSION}) and too old "
                        "to migrate; rerun `exitbench run` with the same --out to recompute it (trained backbones "
                        "are reused from the cache), or read it with the exitbench that wrote it")


def upgrade(result: dict, where: Any = "result") -> dict:
    """``result`` migrated to ``SCHEMA_VERSION`` (a copy; the stored file is not touched): each step of
    ``UPGRADES`` in turn, asv-style. Refuses what :func:`check_schema` refuses."""
    check_schema(result, where)
    v = result["schema_version"]
    if v == SCHEMA_VERSION:
        return result
    out = copy.deepcopy(result)
    while v < SCHEMA_VERSION:
        out = UPGRADES[v](out)
        v = out["schema_version"] = v + 1
    return out


def _upgrade_3(d: dict) -> dict:
    """Schema 3 -> 4: the config's regime resolved and stored. Schema 3 wrote ``regime`` only where ``init``
    and the method's own regime could not say it, so: an explicit ``regime`` stays (the method's own regime
    is then unknown, ""); ``init: scratch`` is the joint regime; otherwise the regime is the method's own,
    which ``trains_backbone`` tells (mixed or disjoint). An error cell stored without ``trains_backbone`` and
    without ``regime`` keeps ``regime`` "" (unknown; a rerun recomputes it anyway). Keys and setting ids of
    the migrated cell equal the stored ones (tests/test_results.py)."""
    c = d.get("config") or {}
    trains = c.pop("trains_backbone", None)
    init = c.pop("init", None)
    if c.get("method") == STATIC:
        c["regime"] = c["method_regime"] = ""
    elif "regime" in c:
        c["method_regime"] = ""
    elif init == "scratch":
        c["regime"], c["method_regime"] = "joint", ""
    elif trains is not None:
        c["regime"] = c["method_regime"] = "mixed" if trains else "disjoint"
    else:
        c["regime"] = c["method_regime"] = ""
    d["config"] = c
    return d


# schema version -> the function that migrates a result of that version one step up
UPGRADES: dict[int, Callable[[dict], dict]] = {3: _upgrade_3}


def result_setting_id(result: CellResult) -> str:
    """The stored ``setting_id`` of a result, or the one its config gives (an error cell stores none)."""
    return result.setting_id or result.config.setting_id()
