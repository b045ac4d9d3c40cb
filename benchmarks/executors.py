"""Executors: where a matrix's cells run. ``local`` (this process), ``local:N`` (N worker processes) and
``slurm`` (a job array), the last two through submitit.

Every executor runs the same :func:`runner.run_matrix` on its share of the cells, so a cell's result does
not depend on which one ran it; claims (``exitbench.claims``) make the shares safe to overlap, to be
requeued and to run beside another ``exitbench run`` on the same ``--out``.

- ``local:N``: submitit's ``LocalExecutor`` starts N processes, each with a share of the cells (the cells
  of one backbone together); on a
  machine with G GPUs worker i runs on ``cuda:(i mod G)``, on CPU each gets ``threads // N`` threads
  (at least one). The parent waits for all of them.
- ``slurm``: submitit's ``SlurmExecutor`` submits one job array, a task per cell (``--slurm-chunk`` cells
  per task), with the partition, time, GPUs, memory and any extra ``#SBATCH`` option given. Each task's log
  is under ``OUT/slurm/``. A task that is preempted or runs out of time is requeued by submitit (the task
  is ``Checkpointable``); cells it had finished are reused, the cell it was on is taken over once its
  claim goes stale. The parent exits after submitting; ``exitbench plan MATRIX --out OUT`` shows progress.
"""

from __future__ import annotations

import re
import shutil
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exitbench.benchmarks.config import Cell
from exitbench.errors import UserError, did_you_mean, raise_terminated

EXECUTORS = ("local", "local:N", "slurm")


@dataclass(frozen=True)
class ExecutorSpec:
    """A parsed ``--executor``: its kind, the number of local workers, and the Slurm options."""

    kind: str
    workers: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)


def parse_executor(spec: str) -> ExecutorSpec:
    """``local``, ``local:N`` (N >= 1) or ``slurm``; anything else is a one-line error with the nearest name."""
    kind, _, n = spec.partition(":")
    if kind == "local" and not n:
        return ExecutorSpec("local")
    if kind == "local":
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--executor: {spec!r}: local:N needs a whole number of workers N >= 1, e.g. local:4")
        return ExecutorSpec("local", int(n))
    if spec == "slurm":
        return ExecutorSpec("slurm")
    raise UserError(f"--executor: unknown executor {spec!r}; {did_you_mean(kind, list(EXECUTORS))}")


def parse_slurm_time(text: str) -> int:
    """Minutes from Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``) or
    ``90m`` / ``4h`` / ``2d``."""
    t = text.strip()
    m = re.fullmatch(r"(\d+)\s*([mhd])", t)
    if m:
        return int(m.group(1)) * {"m": 1, "h": 60, "d": 1440}[m.group(2)]
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if m:
        days, a, b, c = (int(g) if g else None for g in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            minutes = days * 1440 + a * 60 + (b or 0) + ((c or 0) + 59) // 60
        elif b is None:  # MM
            minutes = a
        elif c is None:  # MM:SS
            minutes = a + (b + 59) // 60
        else:  # HH:MM:SS
            minutes = a * 60 + b + (c + 59) // 60
        if minutes > 0:
            return minutes
    raise UserError(f"--slurm-time: cannot read {text!r} as a time limit; give minutes (90), HH:MM:SS "
                    "(04:00:00), D-HH:MM (1-12:00) or 90m / 4h / 2d")


def slurm_options(partition: str | None, time: str | None, gpus: int | None, mem: str | None,
                  extra: list[str] | None, chunk: int, parallel: int | None) -> dict[str, Any]:
    """The submitit ``SlurmExecutor`` parameters, by its own names, for the ``--slurm-*`` options (checked:
    one-line errors). ``time`` is in minutes."""
    opts: dict[str, Any] = {"time": parse_slurm_time(time) if time else 240}
    if partition:
        opts["partition"] = partition
    if gpus is not None:
        if gpus < 0:
            raise UserError(f"--slurm-gpus: must be 0 or more GPUs per task, got {gpus}")
        opts["gpus_per_node"] = gpus
    if mem:
        if not re.fullmatch(r"\d+[KMGT]?", mem.strip().upper()):
            raise UserError(f"--slurm-mem: {mem!r} is not a Slurm memory size; give e.g. 32G or 16000M")
        opts["mem"] = mem.strip().upper()
    additional = {}
    for kv in extra or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise UserError(f"--slurm-opt: {kv!r} is not KEY=VALUE; e.g. --slurm-opt account=myproj")
        additional[k.strip().removeprefix("--")] = v.strip()
    if additional:
        opts["additional_parameters"] = additional
    if chunk < 1:
        raise UserError(f"--slurm-chunk: must be at least 1 cell per task, got {chunk}")
    if parallel is not None:
        if parallel < 1:
            raise UserError(f"--slurm-parallel: must be at least 1 task at a time, got {parallel}")
        opts["array_parallelism"] = parallel
    return opts


def check_slurm() -> None:
    """submitit importable and ``sbatch`` on PATH, or a one-line error saying what to install."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--executor slurm: submitit is not installed (a dependency of exitbench); "
                        "pip install submitit") from None
    if shutil.which("sbatch") is None:
        raise UserError("--executor slurm: sbatch is not on PATH; run on a Slurm login node, or use "
                        "--executor local:N on this machine")


def _task(cells: list[Cell], out_dir: Path, cache_dir: Path, kw: dict[str, Any]) -> dict[str, int]:
    """One worker: run_matrix on its share (the parent wrote the manifest and writes the summary)."""
    from exitbench.benchmarks.runner import run_matrix

    return run_matrix(cells, out_dir, cache_dir, progress=False, manifest=False, **kw)


def _checkpointable():
    import submitit

    class MatrixTask(submitit.helpers.Checkpointable):
        """A share of the matrix; on preemption or timeout submitit requeues it with the same arguments."""

        def __call__(self, cells, out_dir, cache_dir, kw):
            return _task(cells, out_dir, cache_dir, kw)

    return MatrixTask()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shares(cells: list[Cell], n: int) -> list[list[Cell]]:
    """``n`` shares, the empty ones dropped. Cells that need the same harness-trained backbone go to one
    share (otherwise two workers reach it together and one waits while the other trains it); the groups are
    dealt largest first to the share with the fewest cells."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        key = (c.dataset, repr(sorted(c.dataset_options.items())), c.backbone, c.weights, c.small_stem, c.seed,
               repr(c.backbone_training))
        groups.setdefault(key, []).append(c)
    parts: list[list[Cell]] = [[] for _ in range(n)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(parts, key=len).extend(group)
    return [p for p in parts if p]


def run_local_workers(cells: list[Cell], out_dir: Path, cache_dir: Path, workers: int, kw: dict[str, Any]
                      ) -> dict[str, int]:
    """``local:N``: N submitit local processes, each on its share and device; returns the summed counts."""
    import submitit

    gpus = _gpus()
    parts = shares(cells, workers)
    per_worker = []
    for i, share in enumerate(parts):
        if gpus and all(c.evaluation.device in ("auto", "cuda") for c in share):
            share = [replace(c, evaluation=replace(c.evaluation, device=f"cuda:{i % gpus}")) for c in share]
        elif not gpus:  # the CPU's threads are split between the workers
            share = [replace(c, evaluation=replace(c.evaluation, threads=max(1, c.evaluation.threads // len(parts))))
                     for c in share]
        per_worker.append(share)
    executor = submitit.LocalExecutor(folder=out_dir / "logs" / "local")
    executor.update_parameters(timeout_min=60 * 24 * 7)  # local workers are not killed for time
    jobs = executor.map_array(_task, per_worker, [out_dir] * len(parts), [cache_dir] * len(parts),
                              [kw] * len(parts))
    # the workers are processes of their own: stopping the parent (Ctrl-C, kill) must stop them too
    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        counts: dict[str, int] = {}
        for job in jobs:
            for k, v in job.result().items():
                counts[k] = counts.get(k, 0) + v
        return counts
    except BaseException:
        for job in jobs:
            job.cancel(check=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


def submit_slurm(cells: list[Cell], out_dir: Path, cache_dir: Path, options: dict[str, Any], chunk: int,
                 kw: dict[str, Any]) -> list[str]:
    """``slurm``: one job array, a task per ``chunk`` cells; returns the job ids (the parent does not wait)."""
    import submitit

    check_slurm()
    parts = [cells[i:i + chunk] for i in range(0, len(cells), chunk)]
    executor = submitit.SlurmExecutor(folder=out_dir / "slurm" / "%j")
    executor.update_parameters(job_name=f"exitbench-{out_dir.name}", **options)
    task = _checkpointable()
    jobs = executor.map_array(task, parts, [out_dir] * len(parts), [cache_dir] * len(parts), [kw] * len(parts))
    return [j.job_id for j in jobs]
