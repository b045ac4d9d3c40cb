"""Executors: where a matrix's cells run. ``local`` (this process), ``local:N`` (N worker processes) and
``slurm`` (a job array), the last two through submitit.

Every executor runs the same :func:`runner.run_matrix` on its share of the cells, so a cell's result does
not depend on which one ran it; claims (``exitbench.core.claims``) make the shares safe to overlap, to be
requeued and to run beside another ``exitbench run`` on the same ``--out``.

- ``local:N``: submitit's ``LocalExecutor`` starts N processes, each with a share of the cells (the cells
  of one backbone together); on a machine with G GPUs worker i runs on ``cuda:(i mod G)``, on CPU each gets
  ``threads // N`` threads (at least one). The parent waits for all of them. Workers that share a device
  (N > G, or the CPU) never time beside each other's work: timing holds the device exclusively
  (``benchmarks.lease``).
- ``slurm``: one job array through submitit (``benchmarks.slurm``).
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from exitbench.core.errors import UserError, raise_terminated
from exitbench.core.registry import Registry
from exitbench.core.spec import Cell


@dataclass
class Finished:
    """What a run of the matrix left: cells by outcome (``ok``, ``error``, and ``reanalysed``, ``reused``,
    ``elsewhere`` from local runs, or ``missing`` from a waited job array) and one line per task that ended
    without finishing its cells."""

    counts: dict[str, int]
    failed_tasks: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The one-line tally ``exitbench run`` prints."""
        c = self.counts
        if "missing" in c:
            return f"{c['ok']} ok, {c['error']} errors, {c['missing']} without a result"
        return (f"{c['ok']} ok, {c['error']} errors, {c['reanalysed']} re-analysed, {c['reused']} reused"
                + (f", {c['elsewhere']} left to other runners" if c.get("elsewhere") else ""))

    @property
    def failed(self) -> bool:
        return bool(self.counts.get("error") or self.counts.get("missing") or self.failed_tasks)


class Executor:
    """Where a matrix's cells run: an ``EXECUTORS`` entry, chosen with ``--executor NAME[:ARG]``.

    The constructor reads ``ARG`` and the executor's own options from the command line's ``args`` (one-line
    ``UserError`` for a bad one); :meth:`check` runs before anything is built (e.g. the cluster is there);
    :meth:`run` runs the cells and returns what they left, or None when it only submitted them. A plugin
    adds an executor through the entry-point group ``exitbench.executors``."""

    name: ClassVar[str] = ""

    def __init__(self, arg: str, args: argparse.Namespace):
        self.no_arg(arg, f"write --executor {self.name}")
        _no_slurm_options(args)

    def no_arg(self, arg: str, hint: str) -> None:
        """Refuse an ``ARG`` for an executor that takes none, in one line ending with ``hint``."""
        if arg:
            raise UserError(f"--executor: {self.name} takes no ':{arg}'; {hint}")

    @property
    def shares_work(self) -> bool:
        """Whether the cells run in several processes (then the parent writes the manifest first)."""
        return False

    def check(self, folders: dict[str, Path]) -> None:
        """Refuse, before anything is built, what cannot work (``folders``: option -> the path it names)."""

    def run(self, cells: list[Cell], out_dir: Path, cache_dir: Path, kw: dict[str, Any], *, progress: bool
            ) -> Finished | None:
        raise NotImplementedError


def _no_slurm_options(args: argparse.Namespace) -> None:
    if (any(getattr(args, k, None) is not None for k in ("slurm_partition", "slurm_time", "slurm_gpus", "slurm_mem",
                                                         "slurm_opt", "slurm_parallel"))
            or getattr(args, "slurm_chunk", 1) != 1):
        raise UserError("--slurm-*: these options are for --executor slurm; add it, or drop them")
    if getattr(args, "wait", False):
        raise UserError("--wait: waits for a Slurm job array; it is for --executor slurm (the local executors "
                        "always wait)")


class Local(Executor):
    """this process (`local`), or N submitit worker processes (`local:N`): one per GPU, or CPU threads split"""

    name = "local"

    def __init__(self, arg: str, args: argparse.Namespace):
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise UserError(f"--executor: 'local:{arg}': local:N needs a whole number of workers N >= 1, e.g. local:4")
        super().__init__("", args)
        self.workers = int(arg or 1)

    @property
    def shares_work(self) -> bool:
        return self.workers > 1

    def run(self, cells: list[Cell], out_dir: Path, cache_dir: Path, kw: dict[str, Any], *, progress: bool
            ) -> Finished:
        if self.workers > 1:
            return Finished(run_local_workers(cells, out_dir, cache_dir, self.workers, kw))
        from exitbench.benchmarks.runner import run_matrix

        return Finished(run_matrix(cells, out_dir, cache_dir, progress=progress, **kw))


EXECUTORS: Registry[type[Executor]] = Registry("executor", base=Executor, classes=True, group="exitbench.executors",
                                               field="--executor")
EXECUTORS.register("local", Local)
EXECUTORS.register("slurm", "exitbench.benchmarks.slurm:Slurm",
                   help="one Slurm job array through submitit (--slurm-*); --wait to wait for it")


def get_executor(spec: str, args: argparse.Namespace) -> Executor:
    """The executor ``--executor spec`` names (``NAME`` or ``NAME:ARG``), built from the command line's
    ``args``; a one-line error with the nearest names for an unknown one."""
    name, _, arg = spec.partition(":")
    return EXECUTORS.get(name)(arg, args)


def run_share(cells: list[Cell], out_dir: Path, cache_dir: Path, kw: dict[str, Any]) -> dict[str, int]:
    """One worker (a local process or a Slurm task): run_matrix on its share (the parent wrote the manifest
    and writes the summary)."""
    from exitbench.benchmarks.runner import run_matrix

    return run_matrix(cells, out_dir, cache_dir, progress=False, manifest=False, **kw)


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
    jobs = executor.map_array(run_share, per_worker, [out_dir] * len(parts), [cache_dir] * len(parts),
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
