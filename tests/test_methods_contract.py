"""The method contract, checked for every built-in method on tiny timm backbones.

The checks themselves ship with exitbench (``exitbench.benchmarks.contract``, run by ``exitbench check NAME``
for an installed plugin); this file runs them under pytest.

Parametrised over ``list_methods()`` x three tiny timm families, so a newly registered built-in method
is covered without editing this file. Built-in = registered through an ``exitbench.methods`` entry
point (or the fallback table) that points into the ``methods`` package; plugins from other packages
and methods that tests register on the fly are left to their own tests (an installed plugin can opt
in by name with ``EXITBENCH_TEST_PLUGINS``). The example plugin in
``examples/exitbench-example-plugin`` is checked too (imported from its folder), so the worked example
in docs/adding_a_method.md keeps working.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from exitbench.benchmarks import contract
from exitbench.methods.base import BUILTIN_METHODS, ENTRY_POINT_GROUP, Method, get_method, list_methods

BACKBONES = contract.BACKBONES


def builtin_methods() -> list[str]:
    """The built-in methods' names (registered beside the registry in methods/base.py)."""
    return sorted(BUILTIN_METHODS)


# Installed plugins can opt in: EXITBENCH_TEST_PLUGINS=pool_exits,my_method pytest tests/test_methods_contract.py
PLUGINS = [n for n in os.environ.get("EXITBENCH_TEST_PLUGINS", "").split(",") if n.strip()]
METHODS = builtin_methods() + [n.strip() for n in PLUGINS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These are many tiny forward/backward passes; on a shared, loaded CPU two intra-op threads
    # fight other processes and run 3x slower than one. Restored for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXAMPLE = "example:pool_exits"  # the plugin in examples/, checked here too so that it cannot rot
EXAMPLE_DIR = Path(__file__).parents[1] / "examples" / "exitbench-example-plugin"


def _method_class(name: str) -> type[Method]:
    if name != EXAMPLE:
        return get_method(name)
    if str(EXAMPLE_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_DIR))  # as if pip-installed; an installed copy would win anyway
    return importlib.import_module("exitbench_example_plugin").PoolExits


CASES = [pytest.param(m, b, c, id=f"{c}-{m}-{b}") for c in contract.CHECKS for m in METHODS for b in BACKBONES]
CASES += [pytest.param(EXAMPLE, b, c, id=f"{c}-example-{b}") for c in contract.CHECKS
          for b in ("test_resnet", "test_vit")]


def test_builtins_are_registered_one_way():
    # beside the registry only: not also as entry points of exitbench itself, nor by a decorator
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    toml = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert ENTRY_POINT_GROUP not in toml["project"].get("entry-points", {})
    methods_dir = Path(__file__).parents[1] / "methods"
    assert not [p.name for p in methods_dir.glob("*.py") if "METHODS.register" in p.read_text() and p.name != "base.py"]
    assert set(BUILTIN_METHODS) <= set(list_methods())
    assert all(get_method(n).name == n for n in BUILTIN_METHODS)


@pytest.mark.parametrize("method_name, backbone_name, check", CASES)
def test_contract(method_name, backbone_name, check):
    contract.CHECKS[check](_method_class(method_name), backbone_name)


@pytest.mark.parametrize("method_name", [*METHODS, EXAMPLE])
def test_unknown_hparams_are_user_errors(method_name):
    contract.check_hparams(_method_class(method_name))


def test_a_broken_method_fails_its_checks():
    # the checks can fail: a method whose loss ignores the heads cannot lower it
    from exitbench.methods.pteenet import PTEENet

    class NoLearning(PTEENet):
        name = "no_learning_for_test"

        def loss(self, outputs, target, net):
            return (outputs.logits[0] * 0).sum() + 1.0

    report = contract.run_checks(NoLearning, ("test_resnet",))
    failed = {c for c, _, msg in report if msg}
    assert failed == {"train"}, report
