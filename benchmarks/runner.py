"""Run one cell into a result, and a whole matrix into a results directory.

A cell runs as the named stages of :mod:`exitbench.benchmarks.stages`; :func:`run_cell` is that
sequence. A rerun reuses finished cells, re-analyses (from stored traces and weights, training nothing)
those whose evaluation-only settings changed, and retries errors; results are written atomically.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from exitbench.benchmarks import lease, static
from exitbench.benchmarks import stages as st
from exitbench.benchmarks.config import build_method
from exitbench.benchmarks.data import DataMissing, to_tensors
from exitbench.benchmarks.device import prepare, resolve_device
from exitbench.benchmarks.env import env_fingerprint
from exitbench.benchmarks.latency import TimingProtocol, num_threads
from exitbench.core.claims import DEFAULT_STALE_AFTER, holder, try_claim, wait_for
from exitbench.core.results import SCHEMA_VERSION, CellResult
from exitbench.core.spec import Cell
from exitbench.core.store import DISK_FULL, read_json, remove_orphans, safetensors_problem, write_manifest
from exitbench.methods.base import StagedBackbone, UserError


def run_cell(cell: Cell, out_dir: Path, cache_dir: Path, *, download: bool = False, memo: dict | None = None,
             stale_after: float = DEFAULT_STALE_AFTER) -> CellResult:
    """Run one cell from scratch, stage by stage, and return its result (status ``ok``); raises on failure.
    ``stale_after``: how long a claim on a backbone being trained may go without a heartbeat."""
    start = time.perf_counter()
    device = resolve_device(cell.evaluation.device, "evaluation.device")
    with num_threads(cell.evaluation.threads), lease.working(device):  # timing takes the device to itself
        prepare(device)
        splits = st.prepare_data(cell, download, memo)
        ref = st.prepare_backbone(cell, splits, cache_dir, device, stale_after=stale_after, memo=memo)
        if cell.static:  # a plain model from `baselines`: no method to fit, nothing to exit
            return static.run(cell, splits, ref, out_dir, to_tensors(splits.test)[0], st.elapsed(start))
        fitted = st.fit_method(cell, splits, ref.backbone, device, st.partial_dir(out_dir, cell))
        traces = st.record_traces(fitted.net, splits, st.frozen_identity(cell, ref, fitted), memo)
        st.save_artifacts(out_dir, cell, traces, fitted.net)  # the raw traces: scaling is an analysis
        traces, temps = st.scale_traces(cell, traces)
        sweep, points = st.evaluate_points(cell, fitted.method, traces, fitted.costs, ref.calibration_accuracy)
        test_x, protocol = to_tensors(splits.test)[0], TimingProtocol.of(cell.evaluation)
        timing = st.time_latency(protocol, ref.backbone, fitted.net, points, test_x, fitted.costs.strict,
                                 traces["test"])
        profile, points, latency = st.account_latency(cell, protocol, fitted.method, fitted.net, timing.points, traces,
                                                      test_x, fitted.costs, timing.records)
        risk = st.control_risk(cell, fitted.method, traces, fitted.costs.strict)
        return st.assemble(cell, splits, ref, fitted, traces, sweep, points, latency, risk, st.elapsed(start),
                           profile, temps, timing.notes)


class _StoredCosts:
    """The cost table of a finished cell, read back from its exit rows (for re-analysis)."""

    def __init__(self, result: CellResult):
        self.strict = [e.rel_macs_strict for e in result.exits]
        self.paper = [e.rel_macs_paper for e in result.exits]


def reanalyse(cell: Cell, previous: CellResult, out_dir: Path, *, download: bool = False,
              memo: dict | None = None) -> tuple[CellResult, list[str]]:
    """Re-run the stages downstream of a changed analysis key of a finished cell, from its stored traces
    and weights (nothing is trained); returns the new result and the names of the stages re-run."""
    start = time.perf_counter()
    keys, old = wanted_keys(cell, previous), previous.analysis or {}
    redo = [k for k in ("points", "latency", "risk_control") if keys[k] != old.get(k)]
    keep_timing = not cell.evaluation.latency and bool(previous.latency)  # --no-latency keeps what was measured
    if ("points" in redo or _moved(previous, cell)) and "latency" not in redo and not keep_timing:
        redo.insert(1 if "points" in redo else 0, "latency")  # timed at the headline point, on this device
    if cell.static:
        return _reanalyse_static(cell, previous, out_dir, redo, start, download, memo), redo
    with num_threads(cell.evaluation.threads):
        method = build_method(cell)
        traces, costs = st.load_traces(out_dir, cell), _StoredCosts(previous)
        traces, temps = st.scale_traces(cell, traces)  # deterministic: the same fit as when it ran
        sweep, points = previous.sweep, previous.operating_points
        if "points" in redo:
            sweep, points = st.evaluate_points(cell, method, traces, costs, previous.backbone.calibration_accuracy)
        latency, profile, notes = previous.latency, previous.latency_profile, previous.latency_notes
        if "latency" in redo:
            splits = st.prepare_data(cell, download, memo)
            device = resolve_device(cell.evaluation.device, "evaluation.device")
            prepare(device)
            backbone, net = st.rebuild(cell, splits, method, st.artifact_paths(out_dir, cell)["weights"], device)
            test_x, protocol = to_tensors(splits.test)[0], TimingProtocol.of(cell.evaluation)
            timing = st.time_latency(protocol, backbone, net, points, test_x, costs.strict, traces["test"])
            notes = timing.notes
            profile, points, latency = st.account_latency(cell, protocol, method, net, timing.points, traces, test_x,
                                                          costs, timing.records)
        risk = st.control_risk(cell, method, traces, costs.strict) if "risk_control" in redo else previous.risk_control
    return _reanalysed(previous, cell, redo, start, sweep=sweep, operating_points=points, latency=latency,
                       latency_profile=profile, latency_notes=notes, risk_control=risk, temperature=temps), redo


def _reanalysed(previous: CellResult, cell: Cell, redo: list[str], start: float, **changes) -> CellResult:
    """``previous`` with the re-computed ``changes`` (``latency`` among them) and the bookkeeping every
    re-analysis records: the cell's current config and analysis keys, where it was timed, what was re-run."""
    ran = previous.config  # what the method that trained the stored weights said of itself stays
    config = replace(cell, method_version=ran.method_version, score=ran.score, method_regime=ran.method_regime)
    return replace(previous, **changes, reanalysis_error=None, config=config,
                   analysis=wanted_keys(cell, previous),
                   env_analysis=env_fingerprint(_device_of(changes["latency"], cell), cell.evaluation.threads,
                                                cell.evaluation.dtype),
                   reanalysed={"stages": redo, "seconds": st.elapsed(start), "finished": st.now()})


def _reanalyse_static(cell: Cell, previous: CellResult, out_dir: Path, redo: list[str], start: float,
                      download: bool, memo: dict | None) -> CellResult:
    """A static baseline's re-analysis: only its timing depends on evaluation settings."""
    if "latency" not in redo:
        return _reanalysed(previous, cell, redo, start, latency=previous.latency)
    with num_threads(cell.evaluation.threads):
        splits = st.prepare_data(cell, download, memo)
        device = resolve_device(cell.evaluation.device, "evaluation.device")
        prepare(device)
        model = static.rebuild(cell, splits, st.artifact_paths(out_dir, cell)["weights"], device)
        timing = static.time_static(cell, TimingProtocol.of(cell.evaluation), model, splits,
                                    to_tensors(splits.test)[0])
    return _reanalysed(previous, cell, redo, start, latency=timing.records, latency_notes=timing.notes)


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.slug()}.json"


def existing(path: Path) -> CellResult | None:
    """The stored result at ``path``; None when there is none, it is unreadable, or it was written with
    another schema version (all recomputed)."""
    try:
        return CellResult.from_dict(read_json(path), path)
    except (OSError, ValueError, TypeError):  # UserError (another schema) is a ValueError
        return None


def reusable(previous: CellResult | None, cell: Cell, out_dir: Path) -> str:
    """'reuse', 'reanalyse' or 'run' for a cell given its stored result (its state for ``exitbench plan``)."""
    if previous is None or not previous.ok:
        return "run"
    if broken_artifacts(out_dir, cell):
        return "run"  # its traces/weights are gone or damaged: recompute from scratch
    return "reuse" if previous.analysis == wanted_keys(cell, previous) and not _moved(previous, cell) else "reanalyse"


def broken_artifacts(out_dir: Path, cell: Cell) -> dict[str, str]:
    """The cell's stored traces and weights that are missing, truncated or garbled, with what is wrong
    (safetensors headers checked, not only existence)."""
    problems = {name: safetensors_problem(p) for name, p in st.artifact_paths(out_dir, cell).items()}
    return {name: why for name, why in problems.items() if why}


def wanted_keys(cell: Cell, previous: CellResult) -> dict[str, str]:
    """The analysis keys a stored result should have for ``cell``. With latency off (``--no-latency``: do
    not time now), the stored timing is kept, and so is its key: nothing measured is thrown away."""
    keys = cell.analysis_keys()
    if not cell.evaluation.latency and previous.latency and previous.analysis:
        keys["latency"] = previous.analysis.get("latency", keys["latency"])
    return keys


def _moved(previous: CellResult, cell: Cell) -> bool:
    """Whether the cell's latency was timed on another device than the one its settings resolve to here
    (``auto`` on a machine with a GPU after a CPU run, say): then it is re-timed, nothing retrained."""
    timed = {x.device for x in previous.latency}
    return bool(timed) and str(resolve_device(cell.evaluation.device, "evaluation.device")) not in timed


def _device_of(latency: list, cell: Cell) -> str:
    """The device the latency records were timed on (or the configured one when nothing was timed)."""
    return latency[0].device if latency else resolve_device(cell.evaluation.device, "evaluation.device").type


def _error(cell: Cell, e: Exception) -> CellResult:
    msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    return CellResult(status="error", cell=cell.slug(), config=cell, schema_version=SCHEMA_VERSION,
                      env=env_fingerprint("cpu", cell.evaluation.threads), error=msg,  # the host at least
                      traceback=traceback.format_exc(limit=8))


def claim_path(claims_dir: Path, cell: Cell) -> Path:
    """The lock file a runner holds while it computes ``cell`` (``exitbench.core.claims``)."""
    return claims_dir / f"{cell.slug()}.lock"


def run_matrix(cells: list[Cell], out_dir: Path, cache_dir: Path, *, download: bool = False,
               progress: bool = True, matrix: str = "matrix", claims_dir: Path | None = None,
               stale_after: float = DEFAULT_STALE_AFTER, manifest: bool = True) -> dict[str, int]:
    """Run every cell not already done; an error in one cell is recorded there and the rest go on.

    A cell whose result exists with status ``ok`` and the same analysis keys is reused; one whose
    evaluation settings changed is re-analysed from its traces and weights (nothing is trained);
    errors are retried. Each cell is claimed first (``claims_dir``, default ``OUT/claims``): a cell that
    another live runner holds is skipped (counted ``elsewhere``), one whose runner stopped heartbeating
    for ``stale_after`` seconds is taken over. The directory's manifest records the cells of this run.
    """
    counts = {"ok": 0, "error": 0, "reused": 0, "reanalysed": 0, "elsewhere": 0}
    claims_dir = claims_dir or out_dir / "claims"
    began = time.time()
    for folder in ("cells", "traces", "weights"):
        remove_orphans(out_dir / folder)
    remove_orphans(cache_dir)
    if manifest:  # an executor's worker runs a share of the matrix: its parent wrote the whole run's manifest
        write_manifest(out_dir, matrix, [c.slug() for c in cells], SCHEMA_VERSION)
    memo: dict = {}
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress)
    held_elsewhere = []
    for cell in bar:
        path = cell_path(out_dir, cell)
        bar.set_postfix_str(f"{cell.backbone} {cell.method}")
        if reusable(existing(path), cell, out_dir) == "reuse":
            counts["reused"] += 1
            tqdm.write(f"reused {cell.slug()}")
            continue
        claim = try_claim(claim_path(claims_dir, cell), stale_after)
        if claim is None:
            held_elsewhere.append(cell)
            tqdm.write(f"later {cell.slug()}: another live runner ({holder(claim_path(claims_dir, cell))}) has it")
            continue
        with claim:
            if claim.taken_from:
                tqdm.write(f"took over {cell.slug()} from {claim.taken_from}")
            _run_claimed(cell, path, out_dir, cache_dir, download, memo, counts, stale_after)
    for cell in held_elsewhere:  # wait until its runner finishes it, or take it over if that runner died
        path = cell_path(out_dir, cell)
        claim = wait_for(claim_path(claims_dir, cell), lambda p=path, c=cell: _finished_since(p, c, out_dir, began),
                         stale_after)
        if claim is None:
            counts["elsewhere"] += 1
            tqdm.write(f"done elsewhere {cell.slug()}")
            continue
        with claim:
            if claim.taken_from:
                tqdm.write(f"took over {cell.slug()} from {claim.taken_from}")
            _run_claimed(cell, path, out_dir, cache_dir, download, memo, counts, stale_after)
    return counts


def _finished_since(path: Path, cell: Cell, out_dir: Path, began: float) -> bool:
    """Another runner finished ``cell``: a reusable result, or an error written after ``began``."""
    r = existing(path)
    if r is None:
        return False
    try:
        return reusable(r, cell, out_dir) == "reuse" or path.stat().st_mtime >= began
    except FileNotFoundError:
        return False


def _run_claimed(cell: Cell, path: Path, out_dir: Path, cache_dir: Path, download: bool, memo: dict,
                 counts: dict[str, int], stale_after: float) -> None:
    previous = existing(path)  # read again under the claim: another runner may have finished it meanwhile
    todo = reusable(previous, cell, out_dir)
    if todo == "reuse":
        counts["reused"] += 1
        tqdm.write(f"reused {cell.slug()}")
        return
    if previous is not None and previous.ok and todo == "run":
        tqdm.write(f"recomputing {cell.slug()}: its stored "
                   + "; ".join(f"{k} {why}" for k, why in broken_artifacts(out_dir, cell).items()))
    try:  # writing belongs here too: a result that cannot be written (NaN, say) is this cell's error only
        if todo == "reanalyse":
            result, redone = reanalyse(cell, previous, out_dir, download=download, memo=memo)
            st.write_result(path, result)
            tqdm.write(f"re-analysed {cell.slug()} ({', '.join(redone)}) in {result.reanalysed['seconds']:.1f} s"
                       ", nothing trained")
            counts["reanalysed"] += 1
        else:
            result = run_cell(cell, out_dir, cache_dir, download=download, memo=memo, stale_after=stale_after)
            st.write_result(path, result)
            tqdm.write(f"ok {cell.slug()} in {result.seconds:.0f} s")
            counts["ok"] += 1
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded in the cell's JSON; the other cells still run
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # nothing more can be written: stop the run
            raise
        _failed(cell, e, path, previous if previous is not None and previous.ok else None, counts)
    # its outcome is stored: the epoch checkpoints are not needed any more (an interrupted cell keeps them)
    shutil.rmtree(st.partial_dir(out_dir, cell), ignore_errors=True)


def _failed(cell: Cell, e: Exception, path: Path, previous: CellResult | None, counts: dict[str, int]) -> None:
    """Record a failure: an error record, or, when the cell had a good result (a re-analysis, or a recompute
    after its artifacts were found damaged, failed), that result kept with the failure beside it
    (``reanalysis_error``): nothing already computed is lost, and the next rerun tries again."""
    error = _error(cell, e)
    if previous is not None:
        kept = replace(previous, reanalysis_error={"error": error.error, "traceback": error.traceback,
                                                   "finished": st.now()})
        st.write_result(path, kept)
        tqdm.write(f"error updating {cell.slug()}: {error.error}; its previous result is kept")
    else:
        st.write_result(path, error)
        tqdm.write(f"error in {cell.slug()}: {error.error}")
    counts["error"] += 1


def preflight(cells: list[Cell], *, download: bool = False, data_optional: bool = False) -> list[str]:
    """Catch what would fail in every cell before running any: missing dataset files, backbones
    that cannot be cut, impossible exit placements. Raises UserError naming the field. With
    ``data_optional`` (``exitbench validate``), datasets whose files are not here are warnings (returned,
    one per dataset) and the rest is checked from what is known without them."""
    memo: dict = {}
    built: dict[tuple, StagedBackbone] = {}
    warnings: dict[str, str] = {}
    for cell in cells:
        try:
            splits = st.prepare_data(cell, download, memo)
        except DataMissing as e:
            if not data_optional:
                raise
            warnings.setdefault(cell.dataset, f"{e} (checked without them; `exitbench run` will need them)")
            splits = st.without_data(cell)
        key = (cell.backbone, cell.small_stem, splits.info.num_classes, tuple(splits.info.input_size))
        if key not in built:
            built[key] = st.make_backbone(cell, splits, weights=False)
        if cell.static:
            continue  # a plain model: building it is the whole check
        st.place(cell, build_method(cell), built[key])
    return list(warnings.values())
