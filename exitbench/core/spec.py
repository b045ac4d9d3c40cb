"""The cell specification, typed and torch-free: what one cell of a matrix is.

``exitbench.benchmarks.config`` reads a matrix once into these types (every value checked there, with the
field's path in the error); the runner carries a :class:`Cell` through a cell's stages; the cell is stored
as the result's ``config`` and read back as a :class:`Cell` (``CellResult.config``), so reports read
``r.config.method`` or ``r.config.hparams["lam"]``, never a dict. Display labels are the reports' concern
(``exitbench.reports.labels``). Nothing here builds a model: the method a cell names is built by
``exitbench.benchmarks.config.build_method``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from exitbench.core.rules import RISKS, SELECTION_RULES

# The ``method`` of a static-baseline cell: a plain timm model from the matrix's ``baselines``, trained with
# the backbones' recipe, no exits (docs/matrices.md). Not a registered method.
STATIC = "static"

# The latency variants a cell times unless the matrix says otherwise (registered in benchmarks.variants).
DEFAULT_VARIANTS = ("backbone", "compaction", "masking", "batch-uniform", "full+select", "per-stage-ideal")


def timed_variants(variants: tuple[str, ...], fast: str) -> tuple[str, ...]:
    """The latency variants a cell times: ``variants``, plus the fast path (``fast-<mode>``) when it is on."""
    return (*variants, f"fast-{fast}") if fast != "none" else variants


@dataclass
class Budget:
    """What a training run may spend; recorded in every result so budgets can be equalised."""

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_seconds: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast in the shared training loop (fp16 on CUDA only)


@dataclass
class BackboneTraining(Budget):
    """The training budget of backbones the harness trains itself (``weights: train``)."""

    epochs: int = 15
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05


@dataclass(frozen=True)
class Evaluation:
    """How a cell is evaluated after training."""

    grid_size: int = 100
    latency: bool = True
    latency_batch_sizes: tuple[int, ...] = ()  # () = the device's: CPU 1, 32, 256; CUDA 1, 64, 256, 1024
    latency_repeats: int = 5
    threads: int = 2
    accuracy_drop: float = 0.01  # the "within 1 point" operating points (shared, per exit, patience)
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # MACs budgets (strict, relative): budget points
    latency_budgets: tuple[float, ...] = (0.5, 0.7)  # predicted batch-1 latency budgets (x the backbone's)
    latency_variants: tuple[str, ...] = DEFAULT_VARIANTS  # registered in benchmarks.variants
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps: training, traces and timing (auto: CUDA if present)
    dtype: str = "float32"  # the inference dtype timed: float32 | bfloat16 | float16
    fast: str = "none"  # none | compile | graphs (CUDA): also time the fast path (benchmarks.fast)
    temperature: str = "none"  # none | per-exit: scale exit scores by temperatures fitted on calibration

    @property
    def timed_variants(self) -> tuple[str, ...]:
        """The latency variants a cell times: ``latency_variants``, plus the fast path when it is on."""
        return timed_variants(self.latency_variants, self.fast)


@dataclass(frozen=True)
class RiskControl:
    """The risk-control trial protocol run on each cell's traces (docs/risk_control.md)."""

    enabled: bool = True
    rules: tuple[str, ...] = SELECTION_RULES  # every registered rule a user can deploy
    risks: tuple[str, ...] = tuple(RISKS.names())
    eps: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    delta: float = 0.1
    trials: int = 100
    n_cal: int = 0  # 0: a quarter of the pooled held-out data, up to 1000


# What a method setting is: everything that makes two cells of one (dataset, backbone) panel more than seeds
# of each other. Seed, dataset and backbone are the other axes; evaluation settings are re-analysed in place.
SETTING_FIELDS = ("method", "method_version", "hparams", "init", "backbone_training", "weights", "small_stem",
                  "dataset_options")


@dataclass(frozen=True)
class Cell:
    """One dataset x backbone x method (+ hyper-parameters) x seed, and how it is evaluated.

    ``method_version``, ``score`` and ``method_regime`` are what the method's class says of itself (its
    version, exit score and own training regime), filled when the matrix is read, so that a stored result
    says them without importing the method.
    """

    dataset: str
    dataset_options: dict[str, Any]
    backbone: str
    weights: str
    small_stem: bool | None
    method: str
    hparams: dict[str, Any]
    seed: int
    # training regime (Method.regimes): disjoint (heads on the frozen trained backbone), mixed (from the
    # trained backbone, all together), joint (all together from a fresh backbone); "" for static baselines
    regime: str = ""
    backbone_training: BackboneTraining = field(default_factory=BackboneTraining)
    evaluation: Evaluation = field(default_factory=Evaluation)
    risk_control: RiskControl = field(default_factory=lambda: RiskControl(enabled=False))
    swept: tuple[str, ...] = ()  # hyper-parameters the matrix sweeps (labels curves; not in the key)
    # a static baseline (method STATIC): the matrix backbones (name, small_stem) whose panels show it and
    # which it is timed against; only reports and timing read it, so it is not in the key
    next_to: tuple[tuple[str, bool | None], ...] = ()
    method_version: str = ""
    score: str = ""
    method_regime: str = ""  # "" for a static baseline, or where a result stored before schema 4 did not say
    # the matrix field this cell came from, for error messages (never stored)
    where: str = field(default="methods[0]", compare=False, metadata={"runtime": True})

    @property
    def static(self) -> bool:
        """A static baseline from the matrix's ``baselines`` (a plain model, no exits, no method)."""
        return self.method == STATIC

    @property
    def init(self) -> str:
        """Where the backbone starts: ``scratch`` (the joint regime) or ``backbone`` (the trained one)."""
        return "scratch" if self.regime == "joint" else "backbone"

    @property
    def trains_backbone(self) -> bool:
        """The method's training changes the backbone (every regime but disjoint)."""
        return not self.static and self.regime != "disjoint"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        """The cell a stored ``config`` describes (unknown keys from newer minor writers are ignored)."""
        names = {f.name for f in fields(cls)} - {"where"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["swept"] = tuple(d.get("swept") or ())
        kw["next_to"] = tuple((str(n), s) for n, s in d.get("next_to") or ())
        kw.setdefault("dataset_options", {})
        for name, kind in (("backbone_training", BackboneTraining), ("evaluation", Evaluation),
                           ("risk_control", RiskControl)):
            if d.get(name) is not None:
                kw[name] = _section(kind, d[name])
        return cls(**kw)

    # ------------------------------------------------------------------ identity

    def _identity(self) -> dict[str, Any]:
        """What determines training and the trained weights. Why this shape: keys and setting ids of results
        stored before schema 4 hash it, so it keeps that form -- ``init`` always, ``regime`` only where
        ``init`` and the method's own regime cannot say it (e.g. SDN mixed, BranchyNet disjoint)."""
        d = {k: getattr(self, k) for k in ("dataset", "dataset_options", "backbone", "weights", "small_stem",
                                            "method", "hparams", "seed")}
        d["backbone_training"] = asdict(self.backbone_training)
        d["init"] = self.init
        if self.regime and not self.static and self.regime not in ("joint", self.method_regime):
            d["regime"] = self.regime
        return d

    def key(self) -> str:
        """Short hash of everything that determines training and the trained weights (the cell's identity).
        Evaluation-only settings (``evaluation``, ``risk_control``) are not in it: changing them re-analyses
        a finished cell from its stored traces and weights instead of retraining."""
        return _hash(self._identity())

    def setting_id(self) -> str:
        """The identity of the cell's method setting: a short hash of ``SETTING_FIELDS`` (dataset options
        without ``root``/``download``, which change where data come from, not what they are). Seeds are
        pooled only within one setting_id."""
        ident = self._identity()
        d = {k: ident.get(k) for k in SETTING_FIELDS}
        d["method_version"] = self.method_version or None
        d["dataset_options"] = self.data_options()
        if "regime" in ident:
            d["regime"] = ident["regime"]
        return _hash(d)

    def data_options(self) -> dict[str, Any]:
        """Dataset options that change what the data are (not ``root``/``download``: where they come from)."""
        return {k: v for k, v in self.dataset_options.items() if k not in ("root", "download")}

    def analysis_keys(self) -> dict[str, str]:
        """One hash per evaluation stage: a stage whose key changed is recomputed on a rerun."""
        ev = asdict(self.evaluation)
        # a static baseline has no operating points and no risk control: only its timing can change
        points = {} if self.static else {k: ev[k] for k in ("grid_size", "accuracy_drop", "budgets")}
        latency = {**points, **{k: ev[k] for k in ("latency", "latency_batch_sizes", "latency_repeats", "threads",
                                                   "latency_variants", "device", "dtype", "latency_budgets")}}
        if ev["fast"] != "none":  # only when on, so that the keys of results stored before it existed stay valid
            latency["fast"] = ev["fast"]
        if self.next_to:  # a static baseline is timed against these backbones
            latency["next_to"] = [list(x) for x in self.next_to]
        risk = {} if self.static else asdict(self.risk_control)
        if ev["temperature"] != "none" and not self.static:  # only when on: stored keys stay valid
            points["temperature"] = latency["temperature"] = risk["temperature"] = ev["temperature"]
        return {"points": _hash(points), "latency": _hash(latency), "risk_control": _hash(risk)}

    def slug(self) -> str:
        """A readable, unique file stem: dataset__backbone__method-hparams__seedN__hash."""
        swept = "-".join(f"{k}{_short(self.hparams[k])}" for k in self.swept)
        meth = f"{self.method}-{swept}" if swept else self.method
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in meth)[:80]
        return f"{self.dataset}__{self.backbone}__{safe}__seed{self.seed}__{self.key()}"


def _section(cls: type, d: dict[str, Any]) -> Any:
    """A stored section (known fields only; JSON lists back to the tuples the types hold)."""
    kw = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def _hash(d: Any) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
