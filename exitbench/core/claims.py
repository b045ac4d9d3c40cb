"""Claims: several runners (processes, hosts of a cluster, tasks of a Slurm array) sharing one results
directory compute each cell once. Torch-free.

Before a runner computes a cell (or trains a cached backbone) it *claims* it: it creates the lock file
``NAME.lock`` with ``O_CREAT | O_EXCL``, which exactly one process can do, and writes who it is into it
(host, PID and the PID's start time, a random token, and under Slurm the job id and restart count). While
it works, a heartbeat thread touches the file every ``stale_after / 4`` seconds. Another runner that finds
the lock skips the cell -- unless its holder is gone, which is decided as early as it can be known:

- on this host, the holder's process no longer exists (or its PID now belongs to a newer process): at once;
- the holder is this Slurm task before it was requeued (same job id, a lower restart count): at once;
- the holder's Slurm job is no longer running (``squeue`` lists it pending, or not at all): at once;
- otherwise (another host, no Slurm to ask) when its heartbeat is older than ``stale_after`` seconds.

Taking over is serialised by a second exclusive file, ``NAME.lock.break``, so two runners that both see an
abandoned lock cannot both take it. Releasing removes the lock only if it still holds this claim's token;
:func:`release_all` releases every claim of this process (a Slurm task about to be requeued calls it).
See docs/slurm.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

DEFAULT_STALE_AFTER = 600.0  # seconds without a heartbeat after which a claim counts as abandoned
SQUEUE_EVERY = 10.0  # seconds a job's state read from squeue is reused (waiting runners poll every second)

_held: set[Claim] = set()  # the claims this process holds now (release_all)
_held_lock = threading.Lock()


class Claim:
    """A held claim on ``path`` (a ``.lock`` file); its heartbeat runs until :meth:`release`.
    ``taken_from``: when the claim was taken over, whose it was and why (for the log)."""

    def __init__(self, path: Path, token: str, stale_after: float, taken_from: str | None = None):
        self.path, self.token, self.taken_from = path, token, taken_from
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(max(0.05, stale_after / 4),), daemon=True)
        self._beat.start()
        with _held_lock:
            _held.add(self)

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:  # taken over (we were presumed dead) or removed: nothing to keep alive
                return

    def held(self) -> bool:
        """Whether the lock file still carries this claim's token."""
        return _owner(self.path).get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._beat is not threading.current_thread():
            self._beat.join()
        with _held_lock:
            _held.discard(self)
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_all() -> int:
    """Release every claim this process holds (a task that is about to be requeued or stopped); their
    cells are free for the next runner at once. Returns how many were released."""
    with _held_lock:
        claims = list(_held)
    for c in claims:
        c.release()
    return len(claims)


def slurm_task() -> dict | None:
    """This process's Slurm job (``JOB`` or ``ARRAYJOB_TASK``, as squeue names it) and restart count, or
    None outside Slurm."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env["SLURM_JOB_ID"]
    try:
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = 0
    return {"job": job, "restart": restart}


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None where there
    is no /proc: it tells a PID's process from a later one that reuses the number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner(path: Path) -> dict:
    try:
        o = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return o if isinstance(o, dict) else {}


def _create(path: Path) -> str | None:
    """Create the lock exclusively; its token, or None when it exists."""
    token = secrets.token_hex(8)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid()),
                   "token": token, "claimed": time.time(), "slurm": slurm_task()}, f)
    return token


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


_squeue_memo: dict[str, tuple[float, str | None]] = {}


def slurm_job_state(job: str) -> str | None:
    """The state squeue gives ``job`` (``RUNNING``, ``PENDING``, ...; ``GONE`` when squeue no longer lists
    it), or None when it cannot be asked (no squeue, no controller answering)."""
    now = time.monotonic()
    seen = _squeue_memo.get(job)
    if seen and now - seen[0] < SQUEUE_EVERY:
        return seen[1]
    state = None
    if shutil.which("squeue"):
        try:
            r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                state = (r.stdout.split() or ["GONE"])[0]
            elif "Invalid job id" in r.stderr:  # purged from the controller: long finished
                state = "GONE"
        except (OSError, subprocess.TimeoutExpired):
            state = None
    _squeue_memo[job] = (now, state)
    return state


def abandoned(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> str | None:
    """Why the lock ``path``'s holder is gone (for the log), or None while it may still be working.
    A missing lock is not abandoned (there is nothing to take over)."""
    p = Path(path)
    age = _age(p)
    if age is None:
        return None
    o = _owner(p)
    pid = o.get("pid")
    here = o.get("host") == socket.gethostname() and isinstance(pid, int)
    if here and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except OSError:  # it exists (another user's process)
            pass
    if here and o.get("started") is not None and _started(pid) not in (None, o["started"]):
        return "its process is gone (its PID is now another process's)"
    theirs, mine = o.get("slurm"), slurm_task()
    if isinstance(theirs, dict) and theirs.get("job"):
        if mine and mine["job"] == theirs["job"] and mine["restart"] > int(theirs.get("restart") or 0):
            return f"it is this Slurm task ({mine['job']}) before its requeue"
        if not (mine and mine["job"] == theirs["job"]):
            state = slurm_job_state(theirs["job"])
            if state is not None and state not in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"):
                return f"its Slurm job {theirs['job']} is {state.lower() if state != 'GONE' else 'no longer queued'}"
    if age > stale_after:
        return f"no heartbeat for {stale_after:g} s"
    return None


def held_live(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """Whether a runner holds the lock ``path``: it exists and its holder is not :func:`abandoned`."""
    return _age(Path(path)) is not None and abandoned(path, stale_after) is None


def try_claim(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
    """Claim ``path`` (a lock file) for this process, or return None when a live runner holds it.

    An abandoned lock (:func:`abandoned`) is taken over. Raises ``OSError`` when the lock cannot be created
    at all (e.g. a read-only directory); callers turn it into a user error.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    token, taken_from = _create(p), None
    if token is None:
        why = abandoned(p, stale_after)
        if why is None:
            return None
        taken_from = f"{holder(p)}: {why}"
        token = _take_over(p, stale_after)
        if token is None:
            return None
    return Claim(p, token, stale_after, taken_from)


def _take_over(p: Path, stale_after: float) -> str | None:
    breaker = p.with_name(p.name + ".break")
    if (_age(breaker) or 0.0) > stale_after:  # a breaker that died while breaking
        breaker.unlink(missing_ok=True)
    if _create(breaker) is None:
        return None  # someone else is taking it over right now
    try:
        if held_live(p, stale_after):  # re-check under the breaker: it may have been released or renewed meanwhile
            return None
        p.unlink(missing_ok=True)
        return _create(p)
    finally:
        breaker.unlink(missing_ok=True)


def holder(path: str | Path) -> str:
    """Who holds the lock ``path``, for messages: ``host:pid`` (and ``slurm JOB``), or ``nobody``."""
    o = _owner(Path(path))
    if "host" not in o or "pid" not in o:
        return "nobody"
    job = (o.get("slurm") or {}).get("job") if isinstance(o.get("slurm"), dict) else None
    return f"{o['host']}:{o['pid']}" + (f" (slurm {job})" if job else "")


def wait_for(path: str | Path, done, stale_after: float = DEFAULT_STALE_AFTER, poll: float = 1.0) -> Claim | None:
    """Wait until ``done()`` is true (another runner finished the work; returns None) or the work is ours to
    do (returns the claim): used for a backbone several cells need, trained once by its first claimant."""
    while True:
        if done():
            return None
        claim = try_claim(path, stale_after)
        if claim is not None:
            if done():  # finished between the check and the claim
                claim.release()
                return None
            return claim
        time.sleep(poll)
