"""Claims: several runners (processes, hosts of a cluster) sharing one results directory compute each
cell once. Torch-free.

Before a runner computes a cell (or trains a cached backbone) it *claims* it: it creates the lock file
``NAME.lock`` with ``O_CREAT | O_EXCL``, which exactly one process can do, and writes who it is (host,
pid, a random token) into it. While it works, a heartbeat thread touches the file every
``stale_after / 4`` seconds. Another runner that finds the lock skips the cell -- unless its runner is
gone: a holder on this host whose process no longer exists (``kill -9``, a requeued job on the same node)
is taken over at once; one on another host when its heartbeat is older than ``stale_after`` seconds (a
lost node, a preempted job elsewhere), since its process cannot be checked from here. Taking over is
serialised by a second exclusive file, ``NAME.lock.break``, so two runners that both see a stale lock
cannot both take it. Releasing removes the lock only if it still holds this claim's token.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

DEFAULT_STALE_AFTER = 600.0  # seconds without a heartbeat after which a claim counts as abandoned


class Claim:
    """A held claim on ``path`` (a ``.lock`` file); its heartbeat runs until :meth:`release`.
    ``taken_from``: when the claim was taken over, whose it was and why (for the log)."""

    def __init__(self, path: Path, token: str, stale_after: float, taken_from: str | None = None):
        self.path, self.token, self.taken_from = path, token, taken_from
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(max(0.05, stale_after / 4),), daemon=True)
        self._beat.start()

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
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._beat.join()
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create(path: Path) -> str | None:
    """Create the lock exclusively; its token, or None when it exists."""
    token = secrets.token_hex(8)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                   "claimed": time.time()}, f)
    return token


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def held_live(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """Whether a runner holds the lock ``path``: it has heartbeated within ``stale_after`` seconds and, when
    it is on this host, its process is alive."""
    age = _age(Path(path))
    return age is not None and age <= stale_after and not dead_here(path)


def dead_here(path: str | Path) -> bool:
    """Whether the lock's holder ran on this host and its process is gone (its PID no longer exists)."""
    o = _owner(Path(path))
    if o.get("host") != socket.gethostname() or not isinstance(o.get("pid"), int) or o["pid"] == os.getpid():
        return False
    try:
        os.kill(o["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's process): alive
        return False
    return False


def try_claim(path: str | Path, stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
    """Claim ``path`` (a lock file) for this process, or return None when a live runner holds it.

    A lock whose heartbeat is older than ``stale_after`` seconds is taken over. Raises ``OSError`` when
    the lock cannot be created at all (e.g. a read-only directory); callers turn it into a user error.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    token, taken_from = _create(p), None
    if token is None:
        if held_live(p, stale_after):
            return None
        why = "its process is gone" if dead_here(p) else f"no heartbeat for {stale_after:g} s"
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
    """Who holds the lock ``path``, for messages: ``host:pid``, or ``nobody``."""
    o = _owner(Path(path))
    return f"{o['host']}:{o['pid']}" if "host" in o and "pid" in o else "nobody"


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
