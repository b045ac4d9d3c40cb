"""``--executor slurm``: the cluster checked before anything is submitted, one job array submitted through
submitit, requeue on preemption or timeout, and ``--wait``'s progress. See docs/slurm.md.

A task runs its cells (``--slurm-chunk``, default 1) one after another with the same
:func:`runner.run_matrix` every executor uses, on the task's one GPU when it asks for one. Claims
(``exitbench.core.claims``) record the task's Slurm job id and restart count, so that a requeued task takes its
own cell back at once and any task takes over a cell whose job squeue no longer lists as running. When
submitit's signal arrives (the time limit is near, or the job is preempted) the task releases its claims
before submitit requeues it; a cell's training resumes from its last epoch checkpoint (``training.fit``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from exitbench.benchmarks.executors import Executor, Finished
from exitbench.core.errors import UserError, did_you_mean
from exitbench.core.spec import Cell

DEFAULT_MINUTES = 240
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "panfs", "wekafs", "9p", "virtiofs",
             "fuse.glusterfs", "fuse.sshfs", "orangefs", "pvfs2", "cvmfs")
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # a folder here is on each host's own disk or memory


def parse_slurm_time(text: str) -> int:
    """Minutes from Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM[:SS]``) or
    ``90m`` / ``4h`` / ``2d``; a limit of zero is an error (Slurm would read it as no limit)."""
    t = text.strip()
    minutes = None
    m = re.fullmatch(r"(\d+)\s*([mhd])", t)
    if m:
        minutes = int(m.group(1)) * {"m": 1, "h": 60, "d": 1440}[m.group(2)]
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
    if minutes == 0:
        raise UserError(f"--slurm-time: {text!r} is no time at all; give the limit per task, e.g. 30 or 04:00:00")
    if minutes is None:
        raise UserError(f"--slurm-time: cannot read {text!r} as a time limit; give minutes (90), HH:MM:SS "
                        "(04:00:00), D-HH:MM (1-12:00) or 90m / 4h / 2d")
    return minutes


def slurm_options(partition: str | None, time_limit: str | None, gpus: int | None, mem: str | None,
                  extra: list[str] | None, chunk: int, parallel: int | None) -> dict[str, Any]:
    """The submitit ``SlurmExecutor`` parameters, by its own names, for the ``--slurm-*`` options (checked:
    one-line errors)."""
    minutes = parse_slurm_time(time_limit) if time_limit else DEFAULT_MINUTES
    # submitit asks Slurm for USR2 this long before the limit (it checkpoints and requeues then); its default
    # 90 s would come before a short task even starts. Slurm checks limits about once a minute.
    opts: dict[str, Any] = {"time": minutes, "signal_delay_s": min(90, max(20, minutes * 60 // 4))}
    if partition:
        opts["partition"] = partition
    if gpus is not None:
        if gpus < 0:
            raise UserError(f"--slurm-gpus: must be 0 or more GPUs per task, got {gpus}")
        if gpus > 1:  # why: a cell uses one device, and a task runs its cells in turn
            raise UserError(f"--slurm-gpus: {gpus} GPUs per task would leave all but one idle (a task runs its "
                            "cells one after another, each on one GPU); ask --slurm-gpus 1 and let Slurm place "
                            "several tasks on a node")
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


def _ask(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]} did not answer in 60 s")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


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


def check_cluster(options: dict[str, Any], folders: dict[str, Path]) -> None:
    """Before anything is submitted: a controller answers, the partition exists, and the ``folders``
    (option -> path: the results, the cache) can be written by the nodes. One-line errors."""
    check_slurm()
    ping = _ask(["scontrol", "ping"])
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        raise UserError("--executor slurm: no Slurm controller answers (scontrol ping: "
                        f"{_last_line(ping.stdout + ping.stderr)}); check that slurmctld runs and SLURM_CONF "
                        "points at its slurm.conf")
    parts = _ask(["sinfo", "-h", "-o", "%R"])
    names = sorted(set(parts.stdout.split()))
    partition = options.get("partition")
    if partition and parts.returncode == 0 and partition not in names:
        raise UserError(f"--slurm-partition: no partition {partition!r} on this cluster; "
                        f"{did_you_mean(partition, names)}")
    nodes = _nodes(partition)
    here = {socket.gethostname(), socket.gethostname().split(".")[0]}
    for option, folder in folders.items():
        remote = sorted(nodes - here)
        if remote and _node_local(folder):
            raise UserError(f"{option}: {folder} is on this host's own disk, which the nodes "
                            f"({', '.join(remote[:3])}{', ...' if len(remote) > 3 else ''}) cannot write; give a "
                            "folder on the cluster's shared filesystem")


def _nodes(partition: str | None) -> set[str]:
    """The host names of the partition's nodes (all nodes without one), expanded by scontrol."""
    listed = _ask(["sinfo", "-h", "-o", "%N", *(["-p", partition] if partition else [])]).stdout.split()
    names: set[str] = set()
    for spec in listed:
        r = _ask(["scontrol", "show", "hostnames", spec])
        names |= set(r.stdout.split()) if r.returncode == 0 else {spec}
    return names


def _node_local(folder: Path) -> bool:
    """Whether ``folder`` is certainly on this host only: a temporary folder, or a tmpfs, not on a network
    filesystem."""
    path = folder.resolve()
    mount, fstype = Path("/"), ""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3:
                point = Path(fields[1].replace("\\040", " "))
                if path.is_relative_to(point) and len(point.parts) >= len(mount.parts):
                    mount, fstype = point, fields[2]
    except OSError:
        return False
    if fstype in SHARED_FS or fstype.startswith("fuse."):
        return False
    return fstype == "tmpfs" or any(path.is_relative_to(p) for p in NODE_LOCAL)


class Slurm(Executor):
    """one Slurm job array through submitit (--slurm-*); --wait to wait for it"""

    name = "slurm"

    def __init__(self, arg: str, args: argparse.Namespace):
        self.no_arg(arg, "give its options as --slurm-*")
        self.options = slurm_options(args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_mem,
                                     args.slurm_opt, args.slurm_chunk, args.slurm_parallel)
        self.chunk, self.wait, self.matrix = args.slurm_chunk, args.wait, args.matrix or "quick"
        check_slurm()

    @property
    def shares_work(self) -> bool:
        return True

    def check(self, folders: dict[str, Path]) -> None:
        check_cluster(self.options, folders)

    def run(self, cells: list[Cell], out_dir: Path, cache_dir: Path, kw: dict[str, Any], *, progress: bool
            ) -> Finished | None:
        from exitbench.benchmarks.runner import cell_path, existing

        submitted = time.time()
        ids = submit_slurm(cells, out_dir, cache_dir, self.options, self.chunk, kw)
        print(f"exitbench: submitted {len(ids)} Slurm tasks (job array {ids[0].split('_')[0]}); logs in "
              f"{out_dir / 'slurm'}" + ("" if self.wait else f"; progress: exitbench plan {self.matrix} "
                                                               f"--out {out_dir}, or rerun with --wait"), flush=True)
        if not self.wait:
            return None
        paths = [cell_path(out_dir, c) for c in cells]
        failed = wait_slurm(ids, [paths[i:i + self.chunk] for i in range(0, len(paths), self.chunk)], out_dir,
                            submitted, progress=progress)
        stored = [existing(p) for p in paths]
        return Finished({"ok": sum(r is not None and r.ok for r in stored),
                         "error": sum(r is not None and not r.ok for r in stored),
                         "missing": sum(r is None for r in stored)}, failed)


def _checkpointable():
    import submitit

    from exitbench.benchmarks.executors import run_share

    class MatrixTask(submitit.helpers.Checkpointable):
        """A share of the matrix; on preemption or timeout submitit requeues it with the same arguments."""

        def __call__(self, cells, out_dir, cache_dir, kw):
            from exitbench.core.claims import slurm_task

            task = slurm_task() or {}
            print(f"exitbench: task {task.get('job')} started at {time.time():.1f} (restart {task.get('restart')})",
                  flush=True)
            return run_share(cells, out_dir, cache_dir, kw)

        def checkpoint(self, *args: Any, **kwargs: Any):
            # the signal that precedes a requeue: free this task's cells now, so that whichever task runs
            # next (this one requeued, or another) starts them at once; their epochs are checkpointed
            from exitbench.core.claims import release_all

            print(f"exitbench: checkpoint signal at {time.time():.1f}: released {release_all()} claims; requeueing",
                  flush=True)
            return super().checkpoint(*args, **kwargs)

    return MatrixTask()


def submit_slurm(cells: list[Cell], out_dir: Path, cache_dir: Path, options: dict[str, Any], chunk: int,
                 kw: dict[str, Any]) -> list[str]:
    """One job array, a task per ``chunk`` cells; returns the tasks' job ids (``ARRAY_i``)."""
    import submitit

    parts = [cells[i:i + chunk] for i in range(0, len(cells), chunk)]
    executor = submitit.SlurmExecutor(folder=out_dir / "slurm" / "%j")
    executor.update_parameters(job_name=f"exitbench-{out_dir.name}", **options)
    jobs = executor.map_array(_checkpointable(), parts, [out_dir] * len(parts), [cache_dir] * len(parts),
                              [kw] * len(parts))
    return [j.job_id for j in jobs]


def task_log(out_dir: Path, task: str) -> Path:
    """The stderr log submitit writes for a task (``ARRAY_i``, or the job id of a one-task array)."""
    return out_dir / "slurm" / task / f"{task}_0_log.err"


def _states(array: str) -> dict[str, str]:
    """Each listed task of the array (``ARRAY_i``) and its state; pending ranges are expanded."""
    r = _ask(["squeue", "-h", "-r", "-j", array, "-o", "%i %T"])
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise OSError(_last_line(r.stderr))
    return dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split()) == 2)


def wait_slurm(tasks: list[str], shares: list[list[Path]], out_dir: Path, since: float, *, progress: bool = True,
               poll: float = 5.0) -> list[str]:
    """Wait until no task of the array is queued or running, showing cells done / running / failed; returns
    one line per task that ended with cells it did not finish (its last log line and the log's path).
    ``shares``: each task's cell result paths; an error result counts when written after ``since``."""
    from tqdm import tqdm

    from exitbench.benchmarks.runner import existing

    def outcome(p: Path) -> str | None:
        r = existing(p)
        if r is None:
            return None
        return "ok" if r.ok else "error" if p.stat().st_mtime >= since else None

    array = tasks[0].split("_")[0]  # a one-task array is submitted as a plain job
    total = sum(len(s) for s in shares)
    bar = tqdm(total=total, desc="cells", unit="cell", disable=not progress)
    misses, said = 0, ""
    while True:
        try:
            states = _states(array)
            misses = 0
        except OSError as e:  # the controller did not answer this once: try again, give up after ten
            misses += 1
            if misses >= 10:
                raise UserError(f"--wait: squeue stopped answering ({e}); the tasks may still run: "
                                f"exitbench plan MATRIX --out {out_dir} shows their progress") from None
            states = None
        if states is not None:
            done = [outcome(p) for s in shares for p in s]
            ok, failed = done.count("ok"), done.count("error")
            running = sum(v == "RUNNING" for v in states.values())
            bar.n = ok + failed
            bar.set_postfix_str(f"{ok} ok, {failed} failed, {running} tasks running, "
                                f"{sum(v == 'PENDING' for v in states.values())} pending")
            bar.refresh()
            line = f"exitbench: {ok}/{total} cells done, {failed} failed, {running} tasks running"
            if not progress and line != said:  # --quiet: a line when something changed
                print(line, flush=True)
                said = line
            if not states:
                break
        time.sleep(poll)
    bar.close()
    lines = []
    for task, share in zip(tasks, shares):
        if any(outcome(p) is None for p in share):
            log = task_log(out_dir, task)
            try:
                last = _error_line(log.read_text(errors="replace"))
            except OSError:
                last = "it left no log (it never started?)"
            lines.append(f"task {task} ended without finishing its cells: {last} (log: {log})")
    return lines


def _error_line(text: str) -> str:
    """The most telling line of a task's stderr: its last error, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|Error|killed|CANCELLED|TIME LIMIT", ln)]
    return (errors or lines or ["empty log"])[-1][:300]

