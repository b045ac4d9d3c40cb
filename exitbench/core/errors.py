"""User-facing errors, torch-free so that every command can catch them without importing torch."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class UserError(ValueError):
    """A mistake in user input (config, names, files). The CLI prints it as one line and exits 2.

    Messages say what was wrong, where (a field path) and what to do.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill`` and schedulers send), raised like Ctrl-C's KeyboardInterrupt so that the same
    unwinding releases every claim and keeps every finished result; see :func:`raise_terminated`."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: ``signal.signal(signal.SIGTERM, raise_terminated)``."""
    raise Terminated


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """A hint naming the valid names closest to ``name`` (or all of them when few)."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = sorted(valid)
    more = f" (and {len(shown) - 12} more)" if len(shown) > 12 else ""
    return "valid names: " + ", ".join(shown[:12]) + more
