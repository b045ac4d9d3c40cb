"""Matrix and cell specs: YAML loading, validation with field paths, expansion into cells.

A matrix file looks like ``benchmarks/matrices/quick.yaml``::

    datasets: [digits]                       # names, or {name, root, download, ...}
    backbones:                               # names, or {name, weights, small_stem}
      - {name: resnet18, weights: train}     # weights: train (default) | pretrained | PATH
    exits: {n_exits: 3, placement: linear}   # shared by every method (a method's hparams override)
    methods:
      - name: pteenet
        hparams: {epochs: 8}                 # fixed hyper-parameters
        grid: {lam: [0.5, 1.0, 2.0]}         # swept: one cell per combination
    seeds: [0]
    backbone_training: {epochs: 15}          # how harness-trained backbones are trained
    evaluation: {grid_size: 100, latency_batch_sizes: [1, 256]}
    risk_control: {rules: [crc, ucb-wsr, ltt], eps: [0.05], delta: 0.1}   # optional
    baselines:                               # optional: static models, trained like the backbones
      - {name: resnet10t, next_to: [resnet18]}   # next_to: the backbones it is compared to (default: all)

Every key is checked; a mistake raises :class:`UserError` naming the field (``methods[0].hparams.lr``)
and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import yaml

from exitbench.benchmarks.device import DTYPES, PRECISIONS, check_device_name
from exitbench.benchmarks.fast import check_fast_mode
from exitbench.benchmarks.variants import LATENCY_VARIANTS
from exitbench.core.rules import RISKS, SELECTION_RULES
from exitbench.core.spec import STATIC, BackboneTraining, Cell, Evaluation, RiskControl
from exitbench.methods.base import OPTIMIZERS, REGIMES, Method, UserError, did_you_mean, get_method

MATRICES_DIR = Path(__file__).parent / "matrices"
TEMPERATURE_MODES = ("none", "per-exit")


def build_method(cell: Cell) -> Method:
    """The method a cell runs, built from its hyper-parameters: the one place a cell's method is made (fit,
    re-analysis, preflight, plan, retime). A name no installed method has raises UserError saying which
    plugin to install."""
    if cell.static:
        raise ValueError("a static baseline has no method to build")
    return _method_class(cell.method)(**cell.hparams)


def _method_class(name: str) -> type[Method]:
    try:
        return get_method(name)
    except UserError as e:
        raise UserError(f"{e} (install the plugin that provides method {name!r})") from None


def check_risk_control(rc: RiskControl, where: str = "risk_control", labels: dict[str, str] | None = None) -> None:
    """Every value of a risk-control spec checked; ``labels`` names a field's source when it is not
    ``where.field`` (a CLI option)."""
    at = lambda key: (labels or {}).get(key, f"{where}.{key}")  # noqa: E731
    for key, valid in (("rules", SELECTION_RULES), ("risks", RISKS.names())):
        for name in getattr(rc, key):
            if name not in valid:
                raise UserError(f"{at(key)}: unknown {key[:-1]} {name!r}; {did_you_mean(name, list(valid))}")
    if not rc.eps:
        raise UserError(f"{at('eps')}: empty list; give at least one risk level, e.g. [0.05]")
    for e in rc.eps:  # again here: the --rc-* options replace values after the matrix was read
        check_value(e, "float", at("eps"), "eps")
    for k, kind in (("delta", "float"), ("trials", "int"), ("n_cal", "int")):
        check_value(getattr(rc, k), kind, at(k), k)
    if rc.n_cal == 1:
        raise UserError(f"{at('n_cal')}: 1 sample cannot calibrate; use 0 (as many as the data allows) or >= 2")


def _hash(d: Any) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


_TOP = {"name", "description", "datasets", "backbones", "exits", "methods", "seeds", "backbone_training", "evaluation",
        "risk_control", "baselines"}
_EXITS = {"n_exits", "placement", "branch_depth"}  # shared by every method that has the hyper-parameter
_DATASET = {"name", "root", "download", "calibration_fraction", "test_fraction", "augment", "train_subset"}
SPLIT_OPTIONS = _DATASET - {"name"}  # how a dataset is split and where it lives; the rest are its own options
_BACKBONE = {"name", "weights", "small_stem"}
_METHOD = {"name", "hparams", "grid", "regime", "init"}
_BASELINE = _BACKBONE | {"next_to"}


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise UserError(f"{where}.{k}: unknown key; {did_you_mean(str(k), sorted(allowed))}".lstrip("."))


def _as_entry(x: Any, where: str) -> dict:
    if isinstance(x, str):
        return {"name": x}
    if isinstance(x, dict) and isinstance(x.get("name"), str):
        return x
    raise UserError(f"{where}: expected a name or a mapping with 'name', got {x!r}")


def _as_list(x: Any, where: str) -> list:
    if x is None:
        raise UserError(f"{where}: missing; give a list")
    return x if isinstance(x, list) else [x]


def _entries(x: Any, where: str) -> list:
    """A matrix list that makes cells (datasets, backbones, methods, seeds): never empty, since an empty
    one would make a run of zero cells (and rewrite an existing results directory's manifest)."""
    items = _as_list(x, where)
    if not items:
        raise UserError(f"{where}: empty list, which gives no cells; give at least one entry")
    return items


# The range of every numeric setting of the matrix's sections (backbone_training, evaluation, risk_control),
# by field name: checked when the matrix is read, so that nothing meaningless reaches a cell.
RANGES: dict[str, tuple[Any, str]] = {
    "epochs": (lambda v: v >= 1, ">= 1 (a backbone must be trained)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_seconds": (lambda v: v > 0, "> 0 seconds, or null for no limit"),
    "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grid_size": (lambda v: v >= 2, ">= 2"),
    "latency_batch_sizes": (lambda v: v >= 1, ">= 1"),
    "latency_repeats": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "accuracy_drop": (lambda v: 0 <= v < 1, "in [0, 1) (0.01 = one point of accuracy)"),
    "budgets": (lambda v: v > 0, "> 0 (relative strict MACs, e.g. 0.5)"),
    "latency_budgets": (lambda v: v > 0, "> 0 (x the backbone's latency, e.g. 0.5)"),
    "eps": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "delta": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "trials": (lambda v: v >= 1, ">= 1"),
    "n_cal": (lambda v: v >= 0, ">= 0 (0 = as many as the data allows)"),
}


def _kind(annotation: str) -> str:
    """What a section field holds, from its annotation: bool, int, float or str (items, for a tuple)."""
    for kind in ("bool", "int", "float", "str"):
        if kind in annotation:
            return kind
    return "any"


def check_value(v: Any, kind: str, where: str, name: str = "") -> Any:
    """One setting's value of ``kind`` (bool, int, float, str), checked against ``RANGES[name]``; a one-line
    UserError naming ``where`` otherwise. Integers must be whole (1.0 is 1, 1.5 is an error) and numbers
    finite; a number written as text gets a hint (YAML reads 1e-3 as a string)."""
    if kind == "bool":
        if not isinstance(v, bool):
            raise UserError(f"{where}: expected true or false, got {v!r}")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise UserError(f"{where}: expected a name, got {v!r}")
        return v
    if kind not in ("int", "float"):
        return v
    if isinstance(v, str):
        try:
            hint = f"; YAML reads {v} as text: write it as {float(v)!r}"
        except ValueError:
            hint = ""
        raise UserError(f"{where}: expected a number, got {v!r}{hint}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}: expected a finite number, got {v!r}")
    if kind == "int":
        if not float(v).is_integer():
            raise UserError(f"{where}: expected a whole number, got {v!r}")
        v = int(v)
    if name in RANGES and not RANGES[name][0](v):
        raise UserError(f"{where}: must be {RANGES[name][1]}, got {v!r}")
    return v


def _dataclass_from(cls: type, d: Any, where: str) -> Any:
    """A section (backbone_training, evaluation, risk_control) from its mapping, every value checked."""
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping, got {d!r}")
    fields = cls.__dataclass_fields__
    _check_keys(d, set(fields), where)
    out = {}
    for k, v in d.items():
        ann, default = str(fields[k].type), fields[k].default
        if ann.startswith("tuple"):
            out[k] = tuple(check_value(x, _kind(ann), f"{where}.{k}[{j}]", k)
                           for j, x in enumerate(_as_list(v, f"{where}.{k}")))
        elif v is None and default is None:
            out[k] = None
        else:
            out[k] = check_value(v, _kind(ann), f"{where}.{k}", k)
    return cls(**out)


def load_matrix(path: str | Path | None) -> dict:
    """Read a matrix YAML (``None`` or ``quick`` = the built-in quick matrix; a bare name is looked
    up in ``benchmarks/matrices``)."""
    p = Path(path) if path else MATRICES_DIR / "quick.yaml"
    if not p.exists() and not p.suffix and (MATRICES_DIR / f"{p}.yaml").exists():
        p = MATRICES_DIR / f"{p}.yaml"
    if not p.exists():
        builtin = sorted(x.stem for x in MATRICES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(str(p), builtin, n=1, cutoff=0.7) if not p.suffix else []
        raise UserError(f"matrix: file {str(p)!r} not found; " + (f"did you mean the built-in {close[0]!r}? " if close
                        else "") + f"give a YAML path or a built-in matrix ({', '.join(builtin)})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"matrix {p}: malformed YAML{at} ({problem}); fix the syntax there") from None
    if not isinstance(data, dict):
        raise UserError(f"matrix {p}: expected a mapping with datasets, backbones, methods, seeds at the top")
    data.setdefault("name", p.stem)
    return data


def expand(matrix: dict) -> list[Cell]:
    """Validate a matrix (names, keys, hyper-parameters) and expand it into cells: the one place a matrix
    becomes typed cells."""
    _check_keys(matrix, _TOP, "")
    training, evaluation, risk_control = _sections(matrix)
    datasets = _datasets(matrix, risk_control)
    backbones = [_model_entry(b, f"backbones[{i}]", _BACKBONE)
                 for i, b in enumerate(_entries(matrix.get("backbones"), "backbones"))]
    _no_repeats([(b["name"], b["weights"], b["small_stem"]) for b in backbones], "backbones")
    baselines = _baselines(matrix.get("baselines") or [], backbones)
    methods = _methods(matrix)
    seeds = _seeds(matrix)
    shared = dict(backbone_training=training, evaluation=evaluation)
    cells = [
        Cell(dataset=d["name"], dataset_options={k: v for k, v in d.items() if k != "name"},
             backbone=b["name"], weights=b["weights"], small_stem=b["small_stem"], seed=s, **shared,
             risk_control=risk_control, **m)
        for d in datasets for b in backbones for m in methods for s in seeds
    ]
    # static baselines: trained with the backbones' recipe on the same data and seeds; nothing to exit or
    # risk-control, so no risk-control block
    return cells + [
        Cell(dataset=d["name"], dataset_options={k: v for k, v in d.items() if k != "name"},
             backbone=b["name"], weights=b["weights"], small_stem=b["small_stem"], method=STATIC, hparams={},
             seed=s, **shared, where=b["where"], next_to=b["next_to"])
        for d in datasets for b in baselines for s in seeds
    ]


def _sections(matrix: dict) -> tuple[BackboneTraining, Evaluation, RiskControl]:
    """The matrix's ``backbone_training``, ``evaluation`` and ``risk_control`` sections, every value checked."""
    training = _dataclass_from(BackboneTraining, matrix.get("backbone_training"), "backbone_training")
    if training.optimizer not in OPTIMIZERS:
        raise UserError(f"backbone_training.optimizer: unknown optimizer {training.optimizer!r}; "
                        f"{did_you_mean(training.optimizer, list(OPTIMIZERS))}")
    if len(training.betas) != 2:
        raise UserError(f"backbone_training.betas: expected two numbers like [0.9, 0.999], got {list(training.betas)}")
    if training.precision not in PRECISIONS:
        raise UserError(f"backbone_training.precision: unknown precision {training.precision!r}; use "
                        f"{', '.join(PRECISIONS)}")
    evaluation = _dataclass_from(Evaluation, matrix.get("evaluation"), "evaluation")
    for v in evaluation.latency_variants:
        if LATENCY_VARIANTS.get(v).fast:  # an unknown name: one line with the nearest ones
            raise UserError(f"evaluation.latency_variants: {v!r} is the fast path; set evaluation.fast: "
                            f"{LATENCY_VARIANTS.get(v).fast} instead of listing it")
    check_fast_mode(evaluation.fast)
    if evaluation.temperature not in TEMPERATURE_MODES:
        raise UserError(f"evaluation.temperature: unknown mode {evaluation.temperature!r}; use "
                        f"{', '.join(TEMPERATURE_MODES)}")
    check_device_name(evaluation.device)
    if evaluation.dtype not in DTYPES:
        raise UserError(f"evaluation.dtype: unknown dtype {evaluation.dtype!r}; use {', '.join(DTYPES)}")
    # a `risk_control` block turns the protocol on (with its defaults for what it leaves out)
    rc = matrix.get("risk_control")
    risk_control = (RiskControl(enabled=False) if rc is None or rc is False
                    else _dataclass_from(RiskControl, {} if rc is True else rc, "risk_control"))
    check_risk_control(risk_control)
    return training, evaluation, risk_control


def _datasets(matrix: dict, risk_control: RiskControl) -> list[dict]:
    """The checked ``datasets`` entries (name and options), each able to give ``risk_control.n_cal`` samples."""
    # kept out of import time (`exitbench --help` should be instant)
    from exitbench.benchmarks.data import (
        CALIBRATION_FRACTION,
        DATASETS,
        TEST_FRACTION,
        check_split,
        dataset_info,
        list_datasets,
        split_sizes,
    )

    datasets = []
    for i, d in enumerate(_entries(matrix.get("datasets", ["digits"]), "datasets")):
        d = _as_entry(d, f"datasets[{i}]")
        if d["name"] not in list_datasets():
            raise UserError(f"datasets[{i}].name: unknown dataset {d['name']!r}; "
                            f"{did_you_mean(d['name'], list_datasets())}")
        own = {k: v for k, v in d.items() if k not in _DATASET}
        options = sorted(_DATASET | set(DATASETS.get(d["name"]).options))
        for k in own:  # a misspelt split option is not a dataset option: suggest from both
            if k not in options:
                raise UserError(f"datasets[{i}].{k}: unknown option for {d['name']}; {did_you_mean(str(k), options)}")
        try:  # dataset-specific options (e.g. synthetic's n, num_classes) are checked by the dataset
            info = dataset_info(d["name"], **own)
        except UserError as e:
            raise UserError(f"datasets[{i}]: {e}") from None
        for key in ("download", "augment"):
            if not isinstance(d.get(key, False), bool):
                raise UserError(f"datasets[{i}].{key}: expected true or false, got {d[key]!r}")
        if not isinstance(d.get("root", ""), str):
            raise UserError(f"datasets[{i}].root: expected a folder path, got {d['root']!r}")
        fractions = d.get("calibration_fraction", CALIBRATION_FRACTION), d.get("test_fraction", TEST_FRACTION)
        check_split(d["name"], info, *fractions, d.get("train_subset"), where=f"datasets[{i}]")
        _, cal, test = split_sizes(info, *fractions)
        if risk_control.enabled and risk_control.n_cal > cal + test:
            raise UserError(f"risk_control.n_cal: {risk_control.n_cal} is more than the {cal + test} held-out samples "
                            f"of datasets[{i}] ({d['name']}: calibration + test) it is drawn from; use at most "
                            f"{cal + test}, or 0 for as many as the data allows")
        datasets.append(d)
    _no_repeats([_hash(d) for d in datasets], "datasets")
    return datasets


def _methods(matrix: dict) -> list[dict[str, Any]]:
    """One entry per method setting (the Cell fields a method entry and its grid give), in matrix order."""
    shared_exits = matrix.get("exits") or {}
    if not isinstance(shared_exits, dict):
        raise UserError(f"exits: expected a mapping like {{n_exits: 3, placement: linear}}, got {shared_exits!r}")
    _check_keys(shared_exits, _EXITS, "exits")
    methods = []
    for i, m in enumerate(_entries(matrix.get("methods"), "methods")):
        m = _as_entry(m, f"methods[{i}]")
        _check_keys(m, _METHOD, f"methods[{i}]")
        methods += _method_settings(m, f"methods[{i}]", shared_exits)
    _no_repeats([(m["method"], _hash(m["hparams"]), m["regime"]) for m in methods], "methods",
                [m["where"] for m in methods])
    return methods


def _method_settings(m: dict, where: str, shared_exits: dict) -> list[dict[str, Any]]:
    """The settings of one ``methods`` entry: its fixed hyper-parameters times its grid, each resolved."""
    if m["name"] == STATIC:
        raise UserError(f"{where}.name: {STATIC!r} is not a method; list plain models under `baselines:` "
                        "(e.g. baselines: [{name: resnet10t}]) to compare static models")
    try:
        cls = get_method(m["name"])
    except UserError as e:
        raise UserError(f"{where}.name: {e}") from None
    if "init" in m:
        raise UserError(f"{where}.init: replaced by `regime`; write regime: joint for init: scratch "
                        "(all together from a fresh backbone) or regime: mixed for init: backbone")
    regime = m.get("regime", cls.default_regime())
    if regime not in cls.regimes:
        raise UserError(f"{where}.regime: {m['name']} trains in {', '.join(cls.regimes)}, not {regime!r}"
                        + ("" if regime in REGIMES else f"; {did_you_mean(str(regime), list(REGIMES))}"))
    # the same exits for every method in a comparison, unless a method's hparams say otherwise
    fixed = {k: v for k, v in shared_exits.items() if k in cls.hparams} | (m.get("hparams") or {})
    grid = m.get("grid") or {}
    for key, val in (("hparams", fixed), ("grid", grid)):
        if not isinstance(val, dict):
            raise UserError(f"{where}.{key}: expected a mapping of hyper-parameter: value, got {val!r}")
    keys = list(grid)
    for k in keys:
        if _as_list(grid[k], f"{where}.grid.{k}") == []:
            raise UserError(f"{where}.grid.{k}: empty list, which would give no cells; give at least one "
                            "value or remove the key")
    facts = dict(method=m["name"], regime=regime, swept=tuple(keys), where=where, method_version=cls.version,
                 score=cls.score, method_regime=cls.default_regime())
    out = []
    for combo in itertools.product(*(_as_list(grid[k], f"{where}.grid.{k}") for k in keys)):
        try:
            hparams = cls.resolve({**fixed, **dict(zip(keys, combo))})  # rejects unknown keys and bad choices
        except UserError as e:
            raise UserError(f"{where}.hparams: {e}") from None
        out.append({**facts, "hparams": hparams})
    return out


def _seeds(matrix: dict) -> list[int]:
    seeds = _entries(matrix.get("seeds", [0]), "seeds")
    for j, s in enumerate(seeds):  # numpy and scikit-learn take seeds in [0, 2**32)
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
            raise UserError(f"seeds[{j}]: expected a whole number from 0 to {2**32 - 1}, got {s!r}")
    _no_repeats(seeds, "seeds")
    return seeds


def _no_repeats(keys: list, where: str, names: list[str] | None = None) -> None:
    """Refuse an entry listed twice (the same cells twice, counted twice): name both places."""
    seen: dict = {}
    for j, k in enumerate(keys):
        if k in seen:
            first, again = (names or [f"{where}[{x}]" for x in range(len(keys))])[seen[k]], \
                (names or [f"{where}[{x}]" for x in range(len(keys))])[j]
            what = "the same setting as" if names else "the same entry as"
            raise UserError(f"{again}: {what} {first}, which would run the same cells twice; remove one")
        seen[k] = j


def _model_entry(b: Any, where: str, allowed: set[str]) -> dict:
    """A checked ``backbones``/``baselines`` entry: a timm model name, its weights and its stem."""
    from exitbench.benchmarks.models import timm  # timm with exitbench's models registered

    b = _as_entry(b, where)
    _check_keys(b, allowed, where)
    if not timm.is_model(b["name"]):
        raise UserError(f"{where}.name: unknown timm model {b['name']!r}; "
                        f"{did_you_mean(b['name'], timm.list_models())}")
    weights = str(b.get("weights", "train"))
    if weights not in ("train", "pretrained"):
        from exitbench.benchmarks.backbones import check_weights_file

        check_weights_file(weights, f"{where}.weights")
    stem = b.get("small_stem", "auto")
    if stem not in ("auto", True, False):
        raise UserError(f"{where}.small_stem: expected auto, true or false, got {stem!r}")
    return {"name": b["name"], "weights": weights, "small_stem": None if stem == "auto" else stem}


def _baselines(entries: Any, backbones: list[dict]) -> list[dict]:
    """The checked ``baselines`` entries, each with the backbones it is compared to (``next_to``)."""
    names = [b["name"] for b in backbones]
    out = []
    for i, e in enumerate(_as_list(entries, "baselines")):
        where = f"baselines[{i}]"
        b = _model_entry(e, where, _BASELINE)
        given = isinstance(e, dict) and "next_to" in e
        # default: every backbone but itself (a baseline that is also a backbone is compared to the others)
        itself = (b["name"], b["small_stem"])
        next_to = (_as_list(e["next_to"], f"{where}.next_to") if given
                   else [bb["name"] for bb in backbones if (bb["name"], bb["small_stem"]) != itself])
        for n in next_to:
            if n not in names:
                raise UserError(f"{where}.next_to: {n!r} is not a backbone of this matrix; "
                                f"{did_you_mean(str(n), names)}")
        refs = tuple((bb["name"], bb["small_stem"]) for bb in backbones if bb["name"] in next_to)
        if not refs:
            raise UserError(f"{where}.next_to: no backbone to compare {b['name']} with; list the backbones whose "
                            "panels should show it")
        if any(n == b["name"] and s == b["small_stem"] for n, s in refs):
            raise UserError(f"{where}.name: {b['name']} is also a backbone it is next to, whose panels already show "
                            "it as the reference; list a smaller model, or drop it from next_to")
        out.append({**b, "where": where, "next_to": refs})
    return out
