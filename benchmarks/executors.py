"""Executors: where a matrix's cells run. ``local`` (this process), ``local:N`` (N worker processes) and
``slurm`` (a job array), the last two through submitit.

Every executor runs the same :func:`runner.run_matrix` on its share of the cells, so a cell's result does
not depend on which one ran it; claims (``exitbench.claims``) make the shares safe to overlap, to be
requeued and to run beside another ``exitbench run`` on the same ``--out``.

- ``local:N``: submitit's ``LocalExecutor`` starts N processes, each with a share of the cells (the cells
  of one backbone together); on a machine with G GPUs worker i runs on ``cuda:(i mod G)``, on CPU each gets
  ``threads // N`` threads (at least one). The parent waits for all of them. Workers that share a device
  (N > G, or the CPU) never time beside each other's work: timing holds the device exclusively
  (``benchmarks.lease``).
- ``slurm``: one job array through submitit (``benchmarks.slurm``).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exitbench.benchmarks.config import Cell
from exitbench.errors import UserError, did_you_mean, raise_terminated

EXECUTORS = ("local", "local:N", "slurm")


@dataclass(frozen=True)
class ExecutorSpec:
    """A parsed ``--executor``: its kind and the number of local workers."""

    kind: str
    workers: int = 1


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
