"""User-facing errors, torch-free so that every command can catch them without importing torch."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class UserError(ValueError):
    """A mistake in user input (config, names, files). The CLI prints it as one line and exits 2.

    Messages say what was wrong, where (a field path) and what to do.
    """


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """A hint naming the valid names closest to ``name`` (or all of them when few)."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = sorted(valid)
    more = f" (and {len(shown) - 12} more)" if len(shown) > 12 else ""
    return "valid names: " + ", ".join(shown[:12]) + more
