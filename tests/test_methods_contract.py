"""The method contract, checked for every built-in method on tiny timm backbones.

Parametrised over ``list_methods()`` x three tiny timm families, so a newly registered built-in method
is covered without editing this file. Built-in = registered through an ``exitbench.methods`` entry
point (or the fallback table) that points into the ``methods`` package; plugins from other packages
and methods that tests register on the fly are left to their own tests (an installed plugin can opt
in by name with ``EXITBENCH_TEST_PLUGINS``). The example plugin in
``examples/exitbench-example-plugin`` is checked too (imported from its folder), so the worked example
in docs/adding_a_method.md keeps working.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import torch

from benchmarks.backbones import create_backbone
from benchmarks.flops import cost_table, head_macs
from benchmarks.traces import collect_trace
from methods.base import _BUILTIN_FALLBACK, ENTRY_POINT_GROUP, Method, UserError, get_method, list_methods
from methods.policies import ThresholdPolicy, first_exit
from tests.conftest import midpoint_thresholds

BACKBONES = ("test_resnet", "test_vit", "test_efficientnet")
NUM_CLASSES = 5
BATCH = 8  # small: 2 shared CPU cores run 3 tests x methods x backbones


def builtin_methods() -> list[str]:
    """Registered names whose entry point lives in the ``methods`` package."""
    targets = dict(_BUILTIN_FALLBACK)
    targets.update({ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
    return sorted(n for n in list_methods() if targets.get(n, "").startswith("methods."))


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


@cache
def _backbone(name: str):
    # Building and measuring a backbone costs a second or more; build each once, copy per test.
    return create_backbone(name, num_classes=NUM_CLASSES, input_size=(3, 32, 32))


EXAMPLE = "example:pool_exits"  # the plugin in examples/, checked here too so that it cannot rot
EXAMPLE_DIR = Path(__file__).parents[1] / "examples" / "exitbench-example-plugin"


def _method_class(name: str) -> type[Method]:
    if name != EXAMPLE:
        return get_method(name)
    if str(EXAMPLE_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLE_DIR))  # as if pip-installed; an installed copy would win anyway
    return importlib.import_module("exitbench_example_plugin").PoolExits


def _method(name: str) -> Method:
    cls = _method_class(name)
    return cls(**{k: v for k, v in {"n_exits": 2}.items() if k in cls.hparams})


def _built(method_name: str, backbone_name: str):
    """(method, net, batch x, labels y) with net.rel_costs set as the harness sets them."""
    torch.manual_seed(0)
    backbone = copy.deepcopy(_backbone(backbone_name))
    m = _method(method_name)
    exits = m.place_exits(backbone)
    net = m.build(backbone, exits, NUM_CLASSES)
    table = cost_table(backbone, exits, [head_macs(h, e) for h, e in zip(net.heads[:-1], exits)])
    net.rel_costs = torch.tensor(table.paper, dtype=torch.float32)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.arange(BATCH) % NUM_CLASSES
    return m, net, x, y


CASES = [pytest.param(m, b, id=f"{m}-{b}") for m in METHODS for b in BACKBONES]
CASES += [pytest.param(EXAMPLE, b, id=f"example-{b}") for b in ("test_resnet", "test_vit")]


def test_every_builtin_in_pyproject_is_in_the_fallback_table_and_vice_versa():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    toml = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = toml["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == _BUILTIN_FALLBACK
    assert set(declared) <= set(METHODS)


@pytest.mark.parametrize("method_name, backbone_name", CASES)
def test_build_and_forward_all_shapes(method_name, backbone_name):
    m, net, x, _ = _built(method_name, backbone_name)
    assert len(net.exits) == 2 and net.num_exits == 3
    net.eval()
    with torch.no_grad():
        out = net.forward_all(x)
    assert [tuple(lg.shape) for lg in out.logits] == [(BATCH, NUM_CLASSES)] * 3
    assert all(torch.isfinite(lg).all() for lg in out.logits)
    if m.score == "confidence":
        assert out.confidence is not None and [tuple(c.shape) for c in out.confidence] == [(BATCH,)] * 3
        assert all(((c > 0) & (c < 1)).all() for c in out.confidence[:-1])
    else:
        assert out.confidence is None
    assert m.score in m.scores


def _backbone_state(net) -> dict[str, torch.Tensor]:
    """The backbone's weights and buffers inside a multi-exit net (stages + final head)."""
    return {**net.stages.state_dict(prefix="stages."), **net.heads[-1].state_dict(prefix="final.")}


@pytest.mark.parametrize("method_name, backbone_name", CASES)
def test_training_steps_lower_the_loss_and_respect_freezing(method_name, backbone_name):
    m, net, x, y = _built(method_name, backbone_name)
    backbone_params = {id(p) for mod in (*net.stages, net.heads[-1]) for p in mod.parameters()}
    trainable = net.trainable_parameters()
    assert trainable, "nothing to train"
    trains_backbone = any(id(p) in backbone_params for p in trainable)
    assert trains_backbone == m.trains_backbone
    frozen_before = {k: v.clone() for k, v in _backbone_state(net).items()}

    opt = torch.optim.Adam(trainable, lr=1e-3)
    net.train()
    first = m.loss(net(x), y, net)
    assert first.dim() == 0 and torch.isfinite(first)
    loss = first
    for _ in range(3):  # one Adam step on a fixed batch should lower the loss; allow up to three
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = m.loss(net(x), y, net)
        if loss.item() < first.item():
            break
    assert loss.item() < first.item(), "three Adam steps on one fixed batch did not lower the loss"

    if not m.trains_backbone:
        after = _backbone_state(net)
        assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before), "frozen backbone changed"
        assert not net.stages.training and not net.heads[-1].training, "a frozen backbone must stay in eval mode"




@pytest.mark.parametrize("method_name, backbone_name", CASES)
def test_forward_dynamic_equals_the_trace(method_name, backbone_name):
    m, net, x, y = _built(method_name, backbone_name)
    net.eval()
    trace = collect_trace(net, x, y)
    for score in m.scores:
        scores = trace.scores(score)
        thresholds = midpoint_thresholds(scores)
        expected_exit = first_exit(scores, torch.tensor([thresholds]))[0]
        expected_pred = trace.predictions().gather(0, expected_exit[None])[0]
        logits, exit_idx = net.forward_dynamic(x, ThresholdPolicy(score, thresholds))
        assert torch.equal(exit_idx, expected_exit), score
        assert torch.equal(logits.argmax(-1), expected_pred), score
        assert 0 < (exit_idx == 0).sum() < len(x), f"{score}: thresholds should send some samples on, not all"


@pytest.mark.parametrize("method_name", [*METHODS, EXAMPLE])
def test_unknown_hparams_are_user_errors(method_name):
    cls = _method_class(method_name)
    with pytest.raises(UserError, match="unknown hyper-parameter"):
        cls(no_such_hparam_xyz=1)
    assert cls.name and cls.hparams, "a method declares its name and hyper-parameters"
    for k, spec in cls.hparams.items():
        if spec.choices is not None:
            assert spec.default in spec.choices, f"{k}: default outside its choices"
            with pytest.raises(UserError, match="not one of"):
                cls(**{k: "no-such-choice"})
