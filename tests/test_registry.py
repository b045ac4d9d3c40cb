"""exitbench.core.registry: lazy entries, entry-point discovery, base-class and entry checks, did-you-mean, help."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from exitbench.core.errors import UserError
from exitbench.core.registry import REGISTRIES, Registry


@pytest.fixture(autouse=True)
def _forget_test_registries():
    """Registries made here must not reach `exitbench list` in later tests."""
    before = dict(REGISTRIES)
    yield
    REGISTRIES.clear()
    REGISTRIES.update(before)


class Base:
    """A base."""


class Good(Base):
    """Good entry: one line of help.

    More text that is not help.
    """

    name = "good"


def test_eager_lazy_and_decorated_entries_resolve_with_help():
    reg: Registry[type] = Registry("thing-a", base=Base, classes=True)
    reg.register("good", Good)
    reg.register("lazy", "tests.test_registry:Good")
    reg.register()(type("Deco", (Base,), {"name": "deco", "__doc__": "Decorated."}))
    assert reg.names() == ["good", "lazy", "deco"] and "lazy" in reg and "nope" not in reg
    assert reg.get("lazy") is Good and reg.get("good") is Good
    assert reg.describe() == [("good", "Good entry: one line of help."), ("lazy", "Good entry: one line of help."),
                              ("deco", "Decorated.")]
    assert REGISTRIES["thing-a"] is reg


def test_unknown_names_and_bad_entries_are_one_line_user_errors():
    reg: Registry[Base] = Registry("thing-b", base=Base, field="things[0].name")
    reg.register("alpha", Base())
    reg.register("broken", "no_such_module_xyz:Thing")
    reg.register("wrong", "tests.test_registry:Good")  # a class, but instances are expected
    with pytest.raises(UserError, match=r"^things\[0\]\.name: unknown thing-b 'alpa'; did you mean 'alpha'\?$"):
        reg.get("alpa")
    with pytest.raises(UserError, match="cannot be imported"):
        reg.get("broken")
    with pytest.raises(UserError, match="is not a tests.test_registry.Base instance"):
        reg.get("wrong")
    with pytest.raises(UserError, match="is not a"):
        reg.register("eager-wrong", 3)


def test_the_entry_check_runs_on_load():
    def same_name(name, cls):
        if cls.name != name:
            raise UserError(f"named {cls.name!r}")

    reg: Registry[type] = Registry("thing-c", base=Base, classes=True, check=same_name)
    reg.register("other", "tests.test_registry:Good")
    with pytest.raises(UserError, match="named 'good'"):
        reg.get("other")


def test_entries_are_discovered_from_an_entry_point_group(monkeypatch):
    group = "exitbench.test-things"
    ep = metadata.EntryPoint("found", "tests.test_registry:Good", group)
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == group else real(**kw))
    reg: Registry[type] = Registry("thing-d", base=Base, classes=True, group=group)
    assert reg.names() == ["found"] and reg.get("found") is Good
    assert "tests.test_registry" in sys.modules


def test_every_product_registry_lists_with_help():
    from exitbench.cli import load_registries

    regs = load_registries()
    product = ("method", "dataset", "score", "placement", "risk", "rule", "latency variant")
    assert set(product) <= set(regs)
    from exitbench.methods.base import BUILTIN_METHODS

    for kind in product:  # other tests register methods of their own: the built-ins must have help
        rows = [(n, h) for n, h in regs[kind].describe() if kind != "method" or n in BUILTIN_METHODS]
        assert rows, kind
        assert all(h for _, h in rows), f"{kind}: an entry without one-line help: {rows}"
