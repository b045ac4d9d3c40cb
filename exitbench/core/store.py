"""The one atomic writer, for every file exitbench writes (results, traces, weights, reports, figures),
and the results directory's manifest. Torch-free.

A writer fills a temporary sibling ``.NAME.HOST.PID.tmp`` and renames it over the target in one step, so a
reader sees the old file or the whole new one, never a torn write, and two writers (processes, or hosts
sharing a file system) never share a temporary file; a writer killed between the two leaves only the
temporary file, which :func:`remove_orphans` deletes once its PID is gone on this host (another host's
after a day: its PIDs cannot be checked from here).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# errnos after which nothing more can be written: the run stops with one line instead of failing every cell
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system"}


ORPHAN_AGE_OTHER_HOST = 86400.0  # seconds after which another host's temporary file counts as abandoned


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"  # no dots: the name is split on them


def check_writable_dir(folder: str | Path, option: str) -> None:
    """``folder`` is (or can be made) a directory this process can write to; else a one-line UserError
    naming ``option``. Called before any work, so that a bad output path costs nothing."""
    from exitbench.core.errors import UserError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option}: {folder} is a file, not a directory; give a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tmp_path(folder / ".write-check")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{option}: cannot write to {folder} ({e.strerror or e}); choose a writable "
                        "directory") from None


def tmp_path(path: str | Path) -> Path:
    """The temporary sibling a writer fills before the rename: ``.NAME.HOST.PID.tmp``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{_host()}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary sibling, which then replaces ``path`` in one rename. The
    temporary file is removed if ``write`` fails. Returns ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename: a crash cannot leave an empty target
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically (no NaN or inf: they are not JSON)."""
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temporary files in ``folder`` left by writers that are no longer running (a kill
    between write and rename); returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        host, pid = (p.name[:-4].rsplit(".", 2) + ["", ""])[1:3]
        if host != _host():
            try:
                alive = time.time() - p.stat().st_mtime < ORPHAN_AGE_OTHER_HOST
            except FileNotFoundError:
                continue
        else:
            alive = False
            if pid.isdigit():
                try:
                    os.kill(int(pid), 0)
                    alive = int(pid) != os.getpid()
                except OSError:
                    alive = False
        if not alive:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (missing, truncated, garbled), or None when it is whole:
    the 8-byte header length, the JSON header, and the tensors' byte ranges that must end exactly at the end of
    the file. Cheap (reads the header only): run whenever a stored artifact is about to be trusted."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                return f"{size} bytes, too short for its header"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable header ({type(e).__name__})"
    if not isinstance(header, dict):
        return "no tensor table in its header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if max(ends, default=0) != size - 8 - n:
        return f"truncated or padded ({size} bytes, its header describes {8 + n + max(ends, default=0)})"
    return None


def write_manifest(results_dir: str | Path, matrix: str, cells: list[str], schema_version: int) -> None:
    """Record which cells (file stems under cells/) the latest matrix run of ``results_dir`` covers;
    reports and compare use these and list any other cells found as not part of the latest run."""
    write_json_atomic(Path(results_dir) / MANIFEST, {"schema_version": schema_version, "matrix": matrix,
                                                      "written": datetime.now(timezone.utc).isoformat(),
                                                      "cells": list(cells)})


def read_manifest(results_dir: str | Path) -> dict | None:
    """The manifest of ``results_dir``, or None when there is none (results from before manifests); a
    manifest that cannot be read is a one-line UserError (guessing which cells it listed would mislead)."""
    from exitbench.core.errors import UserError

    path = Path(results_dir) / MANIFEST
    try:
        m = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        m = e
    if not (isinstance(m, dict) and isinstance(m.get("cells"), list)):
        raise UserError(f"{path}: not an exitbench manifest ({type(m).__name__}); delete it to cover every cell "
                        "found, or rerun `exitbench run` with this --out to rewrite it")
    return m


def latest_run(results_dir: str | Path, paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split result ``paths`` into (part of the latest matrix run, not part of it) by the directory's
    manifest; without a manifest every path counts as part of it."""
    m = read_manifest(results_dir)
    if m is None:
        return list(paths), []
    names = set(m["cells"])
    return [p for p in paths if p.stem in names], [p for p in paths if p.stem not in names]
