"""``exitbench run | validate | plan | list | check | time | doctor | report | compare``: the command line.

User mistakes (bad names, malformed YAML, unknown keys, impossible placements, missing data files)
end as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from exitbench.core.errors import Terminated, UserError, raise_terminated
from exitbench.core.store import DISK_FULL

DEFAULT_OUT = "exitbench_results"
# `exitbench doctor` fails when a per-sample variant's predictions or exits differ from the offline trace in
# more than this share of the timed samples: TF32 on CUDA moves logits by ~1e-3 and can flip a sample that
# sits on a threshold, a bug flips many (docs/measurement.md)
DOCTOR_TOLERANCE = 0.005


def default_cache() -> Path:
    """Harness-trained backbone weights: ``$EXITBENCH_CACHE`` or ``~/.cache/exitbench/weights``."""
    env = os.environ.get("EXITBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "exitbench" / "weights"


def _cells(args: argparse.Namespace, matrix: dict | None = None, data_optional: bool = False):
    from exitbench.benchmarks.config import expand, load_matrix
    from exitbench.benchmarks.runner import preflight
    from exitbench.benchmarks.smoke import smoke_cells

    matrix = load_matrix(args.matrix) if matrix is None else matrix
    cells = expand(matrix)
    if getattr(args, "smoke", False):
        cells = smoke_cells(cells)
    for w in preflight(cells, download=getattr(args, "download", False), data_optional=data_optional):
        print(f"warning: {w}")
    return matrix, cells


def _check_out(out: Path) -> None:
    """--out must be a writable directory (or creatable): checked before anything trains."""
    from exitbench.core.store import check_writable_dir

    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a directory; give a directory for the results")
    check_writable_dir(out / "cells", "--out")


def _check_claims(claims: Path, timeout: float | None) -> None:
    """The claims directory must be writable (a lock file is created there before each cell)."""
    if timeout is not None and not 0 < timeout < math.inf:
        raise UserError(f"--claim-timeout: must be a positive, finite number of seconds, got {timeout:g}")
    try:
        claims.mkdir(parents=True, exist_ok=True)
        probe = claims / f".write-check.{os.getpid()}.lock"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--claims: cannot create lock files in {claims} ({e.strerror or e}); give a writable "
                        "directory that every runner of this --out can reach") from None


def cmd_run(args: argparse.Namespace) -> int:
    from exitbench.benchmarks.config import load_matrix
    from exitbench.benchmarks.executors import get_executor
    from exitbench.core.results import SCHEMA_VERSION
    from exitbench.core.store import write_manifest
    from exitbench.reports.summary import write_summary

    t0 = time.perf_counter()
    _positive(args.threads, "--threads", "CPU threads")
    executor = get_executor(args.executor, args)  # executor mistakes: one line, before anything is built
    matrix = load_matrix(args.matrix)
    if args.smoke:  # smoke results are not results: their own directory and matrix name
        matrix = {**matrix, "name": f"{matrix['name']}-smoke"}
    out = Path(args.out or Path(DEFAULT_OUT) / matrix["name"])
    _check_out(out)  # before the matrix is expanded and backbones are built for the preflight
    claims = Path(args.claims) if args.claims else out / "claims"
    _check_claims(claims, args.claim_timeout)
    cache = Path(args.cache) if args.cache else default_cache()
    # before the preflight builds anything: e.g. the cluster, and what its nodes can reach
    executor.check({"--out": out, "--cache": cache, **({"--claims": claims} if args.claims else {})})
    matrix, cells = _cells(args, matrix)
    cells = _run_overrides(args, cells)
    done = _check_stored(out, cells)
    print(f"exitbench: {len(cells)} cells from matrix {matrix['name']!r} -> {out}"
          + (f" ({done} already have results)" if done else ""))
    kw = {"download": args.download, "matrix": matrix["name"], "claims_dir": claims,
          **({"stale_after": args.claim_timeout} if args.claim_timeout else {})}
    if executor.shares_work:  # the workers run shares; the manifest covers them all
        write_manifest(out, matrix["name"], [c.slug() for c in cells], SCHEMA_VERSION)
    finished = executor.run(cells, out, cache, kw, progress=not args.quiet)
    if finished is None:  # submitted, not waited for
        return 0
    paths = write_summary(out)
    print(f"exitbench: {finished.line()} in {time.perf_counter() - t0:.0f} s")
    for line in finished.failed_tasks:
        print(f"exitbench: {line}", file=sys.stderr)
    for p in [out / "cells", *paths]:
        print(f"  {p}")
    if args.report:
        from exitbench.reports.report import build

        written = build(out, out / "report")
        print(f"  {written['report'][0]}")
    return 1 if finished.failed else 0


def _run_overrides(args: argparse.Namespace, cells: list) -> list:
    """The command line's evaluation and risk-control overrides applied to the cells, checked (devices and
    fast modes) before anything runs. Evaluation only: finished cells are re-analysed, not retrained."""
    from exitbench.benchmarks.device import resolve_device
    from exitbench.benchmarks.fast import check_fast

    overrides = {"threads": args.threads} if args.threads else {}
    if args.no_latency:
        overrides["latency"] = False
    if args.device:
        overrides["device"] = args.device
    if args.fast:
        overrides["fast"] = args.fast
    if overrides:
        cells = [replace(c, evaluation=replace(c.evaluation, **overrides)) for c in cells]
    cells = _risk_overrides(args, cells)
    for spec, fast in sorted({(c.evaluation.device, c.evaluation.fast) for c in cells}):  # one line, nothing run
        device = resolve_device(spec, "--device" if args.device else "evaluation.device")
        check_fast(fast, device, "--fast" if args.fast else "evaluation.fast")
    return cells


def _check_stored(out: Path, cells: list) -> int:
    """Never overwrite what a newer exitbench wrote (older results are recomputed); returns how many cells
    already have results."""
    from exitbench.benchmarks.runner import cell_path, existing
    from exitbench.core.results import check_schema
    from exitbench.core.store import read_json

    for p in (cell_path(out, c) for c in cells):
        try:
            stored = read_json(p)
        except (OSError, ValueError):
            continue
        if isinstance(stored, dict):
            check_schema(stored, p, older_ok=True)
    return sum(existing(cell_path(out, c)) is not None for c in cells)


def _csv(text: str, option: str, kind: type = str) -> tuple:
    """A comma-separated option's values; a one-line error naming ``option`` when one is not a ``kind``."""
    what = {int: "whole numbers", float: "numbers"}.get(kind, "names")
    try:
        values = tuple(kind(x.strip()) for x in text.split(","))
    except ValueError:  # an empty item ("0.1,,0.2") lands here too: a typo, not a shorter list
        raise UserError(f"{option}: expected comma-separated {what}, got {text!r}") from None
    if any(not x.strip() for x in text.split(",")):
        raise UserError(f"{option}: expected comma-separated {what}, got {text!r}")
    return values


def _positive(value: int | None, option: str, what: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{option}: must be a positive number of {what}, got {value}")


def _risk_overrides(args: argparse.Namespace, cells: list) -> list:
    """``--rc-*`` options override (and switch on) the matrix's risk_control block."""
    from exitbench.benchmarks.config import check_risk_control
    from exitbench.core.spec import RiskControl

    if args.no_risk_control:
        return [replace(c, risk_control=RiskControl(enabled=False)) for c in cells]
    given = {"rules": args.rc_rules and _csv(args.rc_rules, "--rc-rules"),
             "risks": args.rc_risks and _csv(args.rc_risks, "--rc-risks"),
             "eps": args.rc_eps and _csv(args.rc_eps, "--rc-eps", float), "delta": args.rc_delta,
             "trials": args.rc_trials}
    given = {k: v for k, v in given.items() if v is not None and v != ""}
    if not given:
        return cells
    out = []
    for c in cells:
        base = c.risk_control if c.risk_control.enabled else RiskControl()
        rc = replace(base, enabled=True, **given)
        check_risk_control(rc, "--rc options", {k: f"--rc-{k}" for k in given})
        out.append(replace(c, risk_control=rc))
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    matrix, cells = _cells(args, data_optional=True)  # data absent here: a warning, not an error
    print(f"matrix {matrix['name']!r} is valid: {len(cells)} cells")
    for c in cells:
        print(f"  {c.slug()}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """How many cells, their state in --out, the backbones to train first, and an estimated cost."""
    from exitbench.benchmarks.config import expand, load_matrix
    from exitbench.benchmarks.device import resolve_device
    from exitbench.benchmarks.plan import plan_cells

    matrix = load_matrix(args.matrix)
    cells = expand(matrix)  # no data needed: sizes are known per dataset, networks are built without weights
    out = Path(args.out) if args.out else None
    if out is not None and not out.is_dir():
        print(f"exitbench plan: {out} does not exist yet: every cell is pending")
        out = None
    device = resolve_device(args.device)
    rate = _plan_rate(args.rate, cells, device)
    if isinstance(rate, dict):
        where = f"each network's own training steps measured on {device} (--rate measured)"
        label = f"{min(rate.values()) / 1e9:.1f} to {max(rate.values()) / 1e9:.1f} G training MAC/s"
    else:
        where = "given by --rate for the target device" if args.rate else f"measured on {device} in 3 s"
        label = f"{rate / 1e9:.1f} G training MAC/s"
    plans = plan_cells(cells, out, Path(args.cache) if args.cache else default_cache(), rate,
                       Path(args.claims) if args.claims else None)
    states = {s: sum(p.state == s for p in plans) for s in ("done", "re-analyse", "running", "failed", "pending")}
    print(f"exitbench plan: matrix {matrix['name']!r}: {len(plans)} cells"
          + (f" in {out}: " + ", ".join(f"{n} {s}" for s, n in states.items() if n) if out else ""))
    backbones = [p for p in plans if p.backbone_s]
    if backbones:
        groups: dict[tuple, list] = {}
        for p in backbones:
            groups.setdefault((p.cell.dataset, p.cell.backbone), []).append(p)
        print(f"backbones to train first ({len(backbones)}): " + "; ".join(
            f"{ds} {bb} seed{'s' if len(ps) > 1 else ''} {', '.join(str(p.cell.seed) for p in ps)} "
            f"({_hours(ps[0].backbone_s)} each)" for (ds, bb), ps in groups.items()))
    print(f"estimate (an estimate, not a measurement): MACs x samples x epochs at {label}, {where}")
    print(f"  {'cell':<60} {'state':<10} {'MMACs':>8} {'backbone':>9} {'method':>9} {'traces':>8} {'timing':>8}"
          f" {'total':>9}")
    for p in plans:
        who = f" ({p.who})" if p.who else ""
        print(f"  {p.cell.slug()[:60]:<60} {p.state + who:<10} {p.macs / 1e6:>8.1f} {_hours(p.backbone_s):>9} "
              f"{_hours(p.method_s):>9} {_hours(p.traces_s):>8} {_hours(p.latency_s):>8} {_hours(p.estimate_s):>9}")
    todo = [p for p in plans if p.state not in ("done", "running")]
    total, left = sum(p.estimate_s for p in plans), sum(p.estimate_s for p in todo)
    print(f"total: {_hours(total)} for the whole matrix, {_hours(left)} for the {len(todo)} cells not done or "
          f"running (estimates at that rate)")
    return 0


def _plan_rate(text: str | None, cells: list, device) -> float | dict:
    """--rate: a number of training MAC/s, ``measured`` (each network trained briefly on --device), or absent
    (ResNet-20's rate measured on --device in 3 s)."""
    from exitbench.benchmarks.plan import measure_model_rates, measure_throughput

    if text is None:
        return measure_throughput(device)
    if text.strip() == "measured":
        return measure_model_rates(cells, device)
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0 or math.isinf(rate):
        raise UserError(f"--rate: expected a positive number of training MAC/s (e.g. 2e13) or `measured`, got {text!r}")
    return rate


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


# The modules that define the product's registries; importing them fills exitbench.core.registry.REGISTRIES.
REGISTRY_MODULES = ("exitbench.methods.base", "exitbench.methods.policies", "exitbench.core.rules",
                    "exitbench.benchmarks.data", "exitbench.benchmarks.variants", "exitbench.benchmarks.backbones",
                    "exitbench.benchmarks.executors")


def load_registries() -> dict:
    """Every registry of the product (kind -> Registry), in the order the modules define them."""
    import importlib

    from exitbench.core.registry import REGISTRIES

    for m in REGISTRY_MODULES:
        importlib.import_module(m)
    first = ("method", "dataset", "score", "placement", "risk", "rule", "latency variant")
    return {k: REGISTRIES[k] for k in sorted(REGISTRIES, key=lambda k: (first.index(k) if k in first else 99, k))}


def cmd_list(args: argparse.Namespace) -> int:
    from exitbench.benchmarks.backbones import TESTED_BACKBONES
    from exitbench.methods.base import get_method

    for kind, reg in load_registries().items():
        if kind == "method":
            print("methods (hyper-parameter = default: help):")
            for name in sorted(reg.names()):
                cls = get_method(name)
                how = f"regime={cls.default_regime()}"
                others = [r for r in cls.regimes if r != cls.default_regime()]
                how += f" (or {'/'.join(others)})" if others else ""
                print(f"  {name:<12} {how:<32} score={cls.score}  {reg.help(name)}")
                for k, spec in cls.hparams.items():
                    default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
                    print(f"      {k} = {default!r}: {spec.help}")
            continue
        print(f"{kind[:-1] + 'ies' if kind.endswith('y') else kind + 's'}:")
        for name, text in reg.describe():
            print(f"  {name:<24} {text}")
        if kind == "backbone family":
            print("  (any other timm model built as stem -> stages -> blocks -> head: the generic rule)")
    print("backbones covered by the tests:\n  " + ", ".join(TESTED_BACKBONES))
    return 0


def cmd_time(args: argparse.Namespace) -> int:
    """Re-time stored cells on --device from their saved weights and append the records."""
    from exitbench.benchmarks.retime import TimeOptions, retime
    from exitbench.reports.summary import write_summary

    t0 = time.perf_counter()
    out = Path(args.results)
    if not out.is_dir():
        raise UserError(f"{out}: no such results directory; give the --out of an `exitbench run`")
    batch_sizes = _csv(args.batch_sizes, "--batch-sizes", int) if args.batch_sizes is not None else ()
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-sizes: batch sizes must be >= 1, got {args.batch_sizes!r}")
    _positive(args.repeats, "--repeats", "timing repeats")
    _positive(args.threads, "--threads", "CPU threads")
    done, skipped = retime(out, args.device, TimeOptions(batch_sizes, args.repeats, args.threads, args.fast))
    write_summary(out)
    print(f"exitbench: re-timed {len(done)} cells of {out} on {args.device} in {time.perf_counter() - t0:.0f} s"
          + (f"; {len(skipped)} without a feasible operating point left as they were" if skipped else ""))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Run the small GPU-check matrix on --device and print every latency variant's ratio to the backbone."""
    import tempfile
    from dataclasses import replace as dc_replace

    from exitbench.benchmarks.config import expand, load_matrix
    from exitbench.benchmarks.device import device_env, resolve_device
    from exitbench.benchmarks.fast import check_fast
    from exitbench.benchmarks.runner import cell_path, existing, run_matrix
    from exitbench.benchmarks.variants import LATENCY_VARIANTS

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    print(f"exitbench doctor: {device_env(device)}")
    matrix = load_matrix("gpu_check")
    # the fast path the GPU targets are about; on a CPU compile takes minutes, so it is opt-in there
    fast = args.fast or ("graphs" if device.type == "cuda" else "none")
    check_fast(fast, device, "--fast")
    cells = [dc_replace(c, evaluation=dc_replace(c.evaluation, device=args.device, fast=fast))
             for c in expand(matrix)]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="exitbench-doctor-"))
    cache = Path(args.cache) if args.cache else default_cache()
    counts = run_matrix(cells, out, cache, progress=not args.quiet, matrix=matrix["name"])
    print(f"{'cell':<44} {'variant':<16} {'batch':>5} {'median ms':>10} {'ratio':>7} {'eager':>6} "
          f"{'differ':>7}  notes")
    wrong = 0  # records of per-sample variants whose decisions differ from the trace's beyond DOCTOR_TOLERANCE
    for c in cells:
        r = existing(cell_path(out, c))
        if r is None or not r.ok:
            print(f"{c.slug()[:44]:<44} failed: {r.error if r else 'no result'}")
            continue
        for x in r.latency:
            share = x.differ_share
            bad = share is not None and share > DOCTOR_TOLERANCE and LATENCY_VARIANTS.get(x.variant).per_sample
            wrong += bad
            notes = ", ".join(n for n, on in (("simulation", x.simulation), ("noisy", x.noisy),
                                               (f"vs {x.against}", x.against is not None),
                                               ("DECISIONS DIFFER FROM THE TRACE", bad)) if on)
            ratio = f"{x.latency_ratio:.3f}" if x.latency_ratio is not None else "1 (ref)"
            eager = f"{x.latency_ratio_eager:.3f}" if x.latency_ratio_eager is not None else ""
            differ = f"{100 * share:.2f}%" if share is not None else ""
            print(f"{c.slug()[:44]:<44} {x.variant:<16} {x.batch_size:>5} {x.median_ms:>10.3f} {ratio:>7} {eager:>6} "
                  f"{differ:>7}  {notes}")
        for note in r.latency_notes:
            print(f"{c.slug()[:44]:<44} note: {note}")
    print(f"exitbench doctor: {counts['ok'] + counts['reused'] + counts['reanalysed']} cells ok, "
          f"{counts['error']} errors" + (f", {wrong} records whose predictions or exits differ from the offline "
                                         f"trace in more than {100 * DOCTOR_TOLERANCE:g} % of samples" if wrong else "")
          + f" in {time.perf_counter() - t0:.0f} s (fast path: {fast}); results in {out}")
    return 1 if counts["error"] or wrong else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run the method contract (benchmarks.contract) against an installed method."""
    from exitbench.benchmarks.contract import BACKBONES, run_checks
    from exitbench.methods.base import get_method

    cls = get_method(args.method)
    backbones = tuple(_csv(args.backbones, "--backbones")) if args.backbones else BACKBONES
    report = run_checks(cls, backbones)
    for check, backbone, msg in report:
        print(f"  {'FAIL' if msg else 'ok  '} {check:<8} {backbone:<18} {msg or ''}".rstrip())
    failed = sum(msg is not None for _, _, msg in report)
    print(f"exitbench check {args.method}: {len(report) - failed} passed, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job (run, validate, plan, list, check, time, doctor, report,
    compare)."""
    p = argparse.ArgumentParser(prog="exitbench", description="Benchmark early-exit methods on timm backbones.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_matrix_tools(sub)
    _add_device_tools(sub)
    _add_report_commands(sub)
    return p


def _add_run(sub) -> None:
    """``exitbench run``: the matrix, where results go, the executor, and the Slurm and risk-control groups."""
    run = sub.add_parser("run", help="run a benchmark matrix (default: the built-in quick matrix)")
    run.add_argument("matrix", nargs="?", default=None, help="matrix YAML path or built-in name (default: quick)")
    run.add_argument("--out", help=f"results directory (default: ./{DEFAULT_OUT}/<matrix name>)")
    run.add_argument("--cache", help="where harness-trained backbones are cached (default: $EXITBENCH_CACHE "
                                     "or ~/.cache/exitbench/weights)")
    run.add_argument("--download", action="store_true", help="download missing torchvision datasets")
    run.add_argument("--threads", type=int, help="CPU threads for training and timing (default: the matrix's)")
    run.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps: where cells train, record traces and are "
                                      "timed (default: the matrix's evaluation.device, auto = CUDA if present); "
                                      "finished cells are re-timed there, not retrained")
    run.add_argument("--fast", help="none | compile | graphs: also time the fast path, torch.compile or CUDA graphs "
                                    "(CUDA only) per bucketed batch size (default: the matrix's evaluation.fast)")
    run.add_argument("--smoke", action="store_true", help="the matrix's machinery on synthetic data of the same "
                                                           "shapes, one epoch, first seed and sweep value (minutes; "
                                                           "results go to OUT ending in -smoke)")
    run.add_argument("--executor", default="local", help="local (this process, default) | local:N (N worker "
                                                         "processes: one per GPU, or the CPU threads split) | slurm "
                                                         "(a submitit job array)")
    _add_slurm_options(run)
    run.add_argument("--report", action="store_true", help="also write the report (exitbench report) into OUT/report "
                                                          "when the run ends")
    run.add_argument("--claims", help="where runners sharing this --out lock the cells they compute (default: "
                                      "OUT/claims; must be reachable by every runner)")
    run.add_argument("--claim-timeout", type=float, help="seconds without a heartbeat after which another runner's "
                                                         "claim counts as abandoned and is taken over (default 600)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_risk_options(run)
    run.set_defaults(func=cmd_run)


def _add_slurm_options(run: argparse.ArgumentParser) -> None:
    """``exitbench run``'s options for ``--executor slurm``."""
    slu = run.add_argument_group("Slurm (with --executor slurm; needs submitit and sbatch)")
    slu.add_argument("--slurm-partition", help="the partition to submit to")
    slu.add_argument("--slurm-time", help="time limit per task: minutes, HH:MM:SS, D-HH:MM, or 90m / 4h (default 4h)")
    slu.add_argument("--slurm-gpus", type=int, help="GPUs per task")
    slu.add_argument("--slurm-mem", help="memory per task, e.g. 32G")
    slu.add_argument("--slurm-opt", action="append", help="any other #SBATCH option as KEY=VALUE (repeatable), "
                                                          "e.g. account=myproj, qos=high")
    slu.add_argument("--slurm-chunk", type=int, default=1, help="cells per array task (default 1: a log per cell)")
    slu.add_argument("--slurm-parallel", type=int, help="at most this many tasks at once (Slurm's %%N)")
    slu.add_argument("--wait", action="store_true", help="wait for the job array with a progress bar, then write "
                                                         "the summary (default: exit once submitted)")


def _add_risk_options(run: argparse.ArgumentParser) -> None:
    """``exitbench run``'s overrides of the matrix's risk_control block."""
    rc = run.add_argument_group("risk control (override the matrix's risk_control block and switch it on)")
    rc.add_argument("--rc-rules", help="comma-separated: naive,crc,crc-raw,ucb-wsr,ucb-hb,ucb-hoeffding,ltt,"
                                       "ucb-wsr-macs,ltt-per-exit,pareto-testing")
    rc.add_argument("--rc-risks", help="comma-separated: gap-prediction,gap-brier,consistency-prediction,"
                                       "consistency-brier")
    rc.add_argument("--rc-eps", help="comma-separated tolerated risks, e.g. 0.01,0.05,0.1")
    rc.add_argument("--rc-delta", type=float, help="failure probability (default 0.1)")
    rc.add_argument("--rc-trials", type=int, help="random calibration/test splits (default 100)")
    rc.add_argument("--no-risk-control", action="store_true", help="skip the risk-control protocol")


def _add_matrix_tools(sub) -> None:
    """The commands that read a matrix or the registries without running it: validate, plan, list, check."""
    val = sub.add_parser("validate", help="check a matrix without running it")
    val.add_argument("matrix", nargs="?", default=None)
    val.add_argument("--download", action="store_true")
    val.set_defaults(func=cmd_validate)
    pln = sub.add_parser("plan", help="a matrix's cells, their state in --out, backbones to train, estimated cost")
    pln.add_argument("matrix", nargs="?", default=None)
    pln.add_argument("--out", help="results directory to report progress on (the --out of `exitbench run`)")
    pln.add_argument("--cache", help="backbone cache (default: $EXITBENCH_CACHE or ~/.cache/exitbench/weights)")
    pln.add_argument("--claims", help="the runners' claims directory (default: OUT/claims)")
    pln.add_argument("--device", default="auto", help="where to measure the throughput (default: auto)")
    pln.add_argument("--rate", help="training MAC/s to assume (to plan for a device you do not have, e.g. 2e13), or "
                                   "`measured`: train each network of the matrix for 2 s on --device and use its own "
                                   "rate (default: ResNet-20's rate, measured on --device in 3 s)")
    pln.set_defaults(func=cmd_plan)
    lst = sub.add_parser("list", help="methods (with each hyper-parameter's default and help), datasets, backbones")
    lst.set_defaults(func=cmd_list)
    chk = sub.add_parser("check", help="run the method contract against an installed method (e.g. a plugin)")
    chk.add_argument("method", help="the method's registered name (its exitbench.methods entry point)")
    chk.add_argument("--backbones", help="comma-separated tiny timm models (default: test_resnet,test_vit,"
                                         "test_efficientnet)")
    chk.set_defaults(func=cmd_check)


def _add_device_tools(sub) -> None:
    """The commands that time on a device: time (stored cells) and doctor (a small matrix)."""
    tim = sub.add_parser("time", help="re-time stored cells on another device from their saved weights")
    tim.add_argument("results", help="results directory (the --out of `exitbench run`)")
    tim.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    tim.add_argument("--batch-sizes", help="comma-separated (default: the device's: CPU 1,32,256; CUDA 1,64,256,1024)")
    tim.add_argument("--repeats", type=int, help="timing repeats (default: the cell's; at least 100 on CUDA)")
    tim.add_argument("--threads", type=int, help="CPU threads (default: the cell's)")
    tim.add_argument("--fast", help="none | compile | graphs: the fast path to time as well (default: the cell's)")
    tim.set_defaults(func=cmd_time)
    doc = sub.add_parser("doctor", help="check the device path: run a small matrix on --device and print every "
                                        "latency variant's ratio (a few minutes on one GPU)")
    doc.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    doc.add_argument("--out", help="results directory (default: a new temporary one)")
    doc.add_argument("--cache", help="backbone cache (default: $EXITBENCH_CACHE or ~/.cache/exitbench/weights)")
    doc.add_argument("--fast", help="none | compile | graphs: the fast path to time as well (default: graphs on "
                                    "CUDA, none elsewhere)")
    doc.add_argument("--quiet", action="store_true", help="no progress bar")
    doc.set_defaults(func=cmd_doctor)


def _add_report_commands(sub) -> None:
    """report and compare: they read stored results only, and import reports/ only when used (matplotlib)."""
    def cmd_report(args: argparse.Namespace) -> int:  # reports/ is imported only when used (matplotlib)
        from exitbench.reports.report import cmd_report
        return cmd_report(args)

    def cmd_compare(args: argparse.Namespace) -> int:
        from exitbench.reports.compare import cmd_compare
        return cmd_compare(args)

    rep = sub.add_parser("report", help="Markdown + HTML report, LaTeX tables and figures from stored results")
    rep.add_argument("results", help="results directory (the --out of `exitbench run`, holding cells/*.json)")
    rep.add_argument("--out", help="output directory (default: RESULTS/report)")
    rep.add_argument("--all", action="store_true", help="include cells that are not part of the latest run")
    rep.add_argument("--paper-view", action="store_true",
                     help="also plot accuracy vs cost reduction in paper accounting (the PTEENet/EENet view)")
    rep.set_defaults(func=cmd_report)
    cmp = sub.add_parser("compare", help="what changed between two results directories (exit code 0)")
    cmp.add_argument("a", help="the baseline results directory")
    cmp.add_argument("b", help="the results directory to compare with it")
    cmp.add_argument("--k", type=float, default=2.0,
                     help="significant: |change| > K x the pooled seed std (default 2)")
    cmp.add_argument("--unchanged", action="store_true", help="list unchanged metrics too")
    cmp.add_argument("--all", action="store_true", help="include cells that are not part of the latest run")
    cmp.add_argument("--out", help="also write the comparison (Markdown) to this file")
    cmp.set_defaults(func=cmd_compare)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = signal.signal(signal.SIGTERM, raise_terminated)  # kill / a scheduler: unwound like Ctrl-C
    try:
        return args.func(args)
    except UserError as e:
        print(f"exitbench: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in DISK_FULL:  # a full disk: one line naming the file, not a traceback
            raise
        print(f"exitbench: error: cannot write {e.filename or 'a file'}: {DISK_FULL[e.errno]}; free space or "
              "choose another --out (finished cells are saved and a rerun resumes)", file=sys.stderr)
        return 2
    except Terminated:
        print("exitbench: stopped by SIGTERM; claims released, finished cells saved, a rerun resumes (exit 143)",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("exitbench: interrupted; claims released, finished cells saved, a rerun resumes (exit 130)",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
