"""Device leases: a cell is never timed beside another cell's work on the same device.

Runners that share a device -- ``local:N`` workers on the CPU or with more workers than GPUs, two
``exitbench run`` on one machine, ``exitbench time`` while a run trains -- coordinate through one lock file
per physical device (``flock``, released by the kernel when a process dies): a cell holds its device
*shared* while it trains, records traces and analyses (:func:`working`), and *exclusively* while it is timed
(:func:`timing`), which waits until every other runner's cell on that device has finished or reached its
own timing. A waiting timer goes first: runners that want to start working queue behind it (a turnstile
lock), so timing is never starved. Under Slurm each task has its GPUs to itself (the scheduler allocates
them), so these locks only matter between processes that see the same device. See docs/slurm.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not POSIX: no locks (one runner per device there)
    fcntl = None

_held: dict[str, list[int]] = {}  # device key -> [fd of the shared lock, nesting depth]


def lease_dir() -> Path:
    """Where the lock files live: ``$EXITBENCH_LEASES`` or a per-user folder in the temporary directory."""
    return Path(os.environ.get("EXITBENCH_LEASES") or Path(tempfile.gettempdir()) / f"exitbench-devices-{os.getuid()}")


def device_key(device: torch.device) -> str:
    """The physical device's name: ``cpu`` or the GPU's UUID (``cuda:0`` is another GPU in another Slurm
    task or under another ``CUDA_VISIBLE_DEVICES``)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda{index}-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}"


def _open(name: str) -> int:
    d = lease_dir()
    d.mkdir(parents=True, exist_ok=True)
    return os.open(d / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)


def _through_turnstile(key: str, fd: int, op: int) -> None:
    """``flock(fd, op)`` behind the turnstile: while a timer waits there, newcomers wait behind it."""
    gate = _open(f"{key}.turnstile")
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(fd, op)
    finally:
        os.close(gate)  # closing releases the turnstile


@contextmanager
def working(device: torch.device) -> Iterator[None]:
    """Hold ``device`` shared while a cell works on it (nested calls in one process share one lock)."""
    if fcntl is None:
        yield
        return
    key = device_key(device)
    if key in _held:
        _held[key][1] += 1
    else:
        fd = _open(key)
        _through_turnstile(key, fd, fcntl.LOCK_SH)
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            os.close(_held.pop(key)[0])


@contextmanager
def timing(device: torch.device) -> Iterator[None]:
    """Hold ``device`` exclusively while a cell is timed; this process's own shared hold (if any) is given
    up meanwhile and taken back after."""
    if fcntl is None:
        yield
        return
    key = device_key(device)
    mine = _held.get(key)
    fd = mine[0] if mine else _open(key)
    if mine:
        fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # another runner works on this device: wait for it (say so: it can take a cell's time)
        tqdm.write(f"timing waits for the other runners on {key} to finish their current cells")
        _through_turnstile(key, fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if mine:  # back to shared, without the turnstile: a timer waiting there waits for this very lock
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            os.close(fd)
