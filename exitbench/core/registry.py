"""One registry type for every pluggable kind: methods, datasets, scores, placements, risks, selection rules
and latency variants.

An entry is an object, or a lazy ``"module:attr"`` string imported on first use (so listing names never
imports torch or a plugin). Each registry may also discover entries from an entry-point group
(``exitbench.methods``, ``exitbench.datasets``, ...): a plugin package declares them in its
``pyproject.toml`` and needs no import. ``get`` checks the base class, runs the registry's own check,
and answers an unknown name with a one-line :class:`UserError` and the nearest names. Every registry
created is listed by ``exitbench list``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from exitbench.core.errors import UserError, did_you_mean

T = TypeVar("T")

REGISTRIES: dict[str, Registry] = {}  # kind -> registry, in creation order (for `exitbench list`)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def first_line(obj: Any) -> str:
    """The first line of ``obj``'s docstring (its one-line help), or ''."""
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry(Generic[T]):
    """Named entries of one kind.

    ``kind`` names the kind in messages (``"method"``, ``"dataset"``); ``base`` is the class every entry
    must be an instance of (or, with ``classes=True``, a subclass of); ``group`` is an entry-point group
    to discover plugins from; ``check(name, entry)`` may raise :class:`UserError` for an entry that
    loads but breaks a rule of its kind. ``field`` is the config field named in errors (default ``kind``).
    """

    def __init__(self, kind: str, *, base: type | None = None, classes: bool = False, group: str | None = None,
                 check: Callable[[str, Any], None] | None = None, field: str | None = None):
        self.kind, self.base, self.classes, self.group = kind, base, classes, group
        self.field = field or kind
        self._check = check
        self._entries: dict[str, Any] = {}  # name -> object or "module:attr"
        self._help: dict[str, str] = {}
        self._discovered = group is None
        REGISTRIES[kind] = self

    def register(self, name: str | None = None, entry: Any = None, *, help: str | None = None) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator (the name defaults to the object's
        ``name`` attribute). ``entry`` may be a ``"module:attr"`` string, loaded on first ``get``."""
        def add(obj: Any) -> Any:
            key = name or getattr(obj, "name", None)
            if not key:
                raise ValueError(f"{self.kind}: an entry needs a name ({obj!r} has no `name`)")
            if not isinstance(obj, str):
                self._validate(key, obj, repr(obj))
            self._entries[key] = obj
            if help is not None or not isinstance(obj, str):
                self._help[key] = help if help is not None else first_line(obj)
            return obj
        return add if entry is None else add(entry)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for ep in metadata.entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        """Every registered or discoverable name, in registration order (discovered plugins last): the
        order results, tables and listings follow."""
        self._discover()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry called ``name``, loaded and checked; an unknown name raises a one-line UserError."""
        self._discover()
        if name not in self._entries:
            raise UserError(f"{self.field}: unknown {self.kind} {name!r}; {did_you_mean(str(name), self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            try:
                obj = _load(entry)
            except (ImportError, AttributeError) as e:
                raise UserError(f"{self.field}: {self.kind} {name!r} points at {entry}, which cannot be imported "
                                f"({e}); reinstall the package that provides it") from None
            self._validate(name, obj, entry)
            self._entries[name] = obj
            self._help.setdefault(name, first_line(obj))
            return obj
        return entry

    def _validate(self, name: str, obj: Any, target: str) -> None:
        if self.base is not None:
            ok = (isinstance(obj, type) and issubclass(obj, self.base)) if self.classes else isinstance(obj, self.base)
            if not ok:
                what = "subclass" if self.classes else "instance"
                raise UserError(f"{self.field}: {self.kind} {name!r} ({target}) is not a "
                                f"{self.base.__module__}.{self.base.__qualname__} {what}")
        if self._check is not None:
            self._check(name, obj)

    def help(self, name: str) -> str:
        """One-line help of ``name`` (loads a lazy entry to read its docstring)."""
        if name not in self._help:
            self.get(name)
        return self._help.get(name, "")

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line help) of every entry, in registration order."""
        return [(n, self.help(n)) for n in self.names()]
