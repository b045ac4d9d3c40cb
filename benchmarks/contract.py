"""The method contract as runnable checks, shipped with exitbench (``exitbench check NAME``).

A plugin author who installed exitbench with pip has no tests/ folder; these are the checks the
repository's contract tests run for every built-in method, as plain functions over a method class
and a tiny timm backbone. Each raises ``AssertionError`` with a message on failure.

- build: ``place_exits`` + ``build`` give a net whose ``forward_all`` has one finite logit tensor per
  exit (and confidences in [0, 1] when the score is ``confidence``);
- train: a few Adam steps with the method's ``loss`` on one fixed batch lower it; a post-trained
  method leaves the backbone's weights unchanged and in eval mode;
- dynamic: ``forward_dynamic`` takes exactly the exits and predictions the threshold policy gives on
  the trace of the same inputs, for every score the method offers;
- hparams: unknown keys and values outside a choice are one-line ``UserError``s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache

import torch

from exitbench.benchmarks.backbones import create_backbone
from exitbench.benchmarks.flops import cost_table, exit_head_macs
from exitbench.benchmarks.traces import collect_trace
from exitbench.methods.base import Method, UserError
from exitbench.methods.policies import ThresholdPolicy, first_exit

BACKBONES = ("test_resnet", "test_vit", "test_efficientnet")
NUM_CLASSES = 5
BATCH = 8


@cache
def _backbone(name: str):
    return create_backbone(name, num_classes=NUM_CLASSES, input_size=(3, 32, 32))


def _method(cls: type[Method]) -> Method:
    return cls(**{k: v for k, v in {"n_exits": 2}.items() if k in cls.hparams})


def built(cls: type[Method], backbone_name: str):
    """(method, net, batch x, labels y) with net.rel_costs set as the harness sets them."""
    torch.manual_seed(0)
    backbone = copy.deepcopy(_backbone(backbone_name))
    m = _method(cls)
    exits = m.place_exits(backbone)
    net = m.build(backbone, exits, NUM_CLASSES)
    table = cost_table(backbone, exits, exit_head_macs(net, exits))
    net.rel_costs = torch.tensor(table.paper, dtype=torch.float32)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.arange(BATCH) % NUM_CLASSES
    return m, net, x, y


def midpoint_thresholds(scores: torch.Tensor) -> tuple[float, ...]:
    """Per-exit thresholds half-way between two observed scores, so float noise cannot flip a decision."""
    out = []
    for s in scores:
        v = s.sort().values
        i = len(v) // 2
        out.append(float((v[i - 1] + v[i]) / 2))
    return tuple(out)


def check_build(cls: type[Method], backbone_name: str) -> None:
    m, net, x, _ = built(cls, backbone_name)
    assert len(net.exits) == 2 and net.num_exits == 3, f"n_exits=2 gave {len(net.exits)} early exits"
    net.eval()
    with torch.no_grad():
        out = net.forward_all(x)
    assert [tuple(lg.shape) for lg in out.logits] == [(BATCH, NUM_CLASSES)] * 3, "forward_all logits shapes"
    assert all(torch.isfinite(lg).all() for lg in out.logits), "non-finite logits"
    if m.score == "confidence":
        assert out.confidence is not None and [tuple(c.shape) for c in out.confidence] == [(BATCH,)] * 3
        assert all(((c >= 0) & (c <= 1)).all() for c in out.confidence[:-1]), "confidence outside [0, 1]"
    else:
        assert out.confidence is None, "confidence returned although the score is not 'confidence'"
    assert m.score in m.scores, f"default score {m.score!r} is not in scores {m.scores}"


def _backbone_state(net) -> dict[str, torch.Tensor]:
    return {**net.stages.state_dict(prefix="stages."), **net.heads[-1].state_dict(prefix="final.")}


def check_train(cls: type[Method], backbone_name: str) -> None:
    m, net, x, y = built(cls, backbone_name)
    backbone_params = {id(p) for mod in (*net.stages, net.heads[-1]) for p in mod.parameters()}
    trainable = net.trainable_parameters()
    assert trainable, "nothing to train"
    trains_backbone = any(id(p) in backbone_params for p in trainable)
    assert trains_backbone == m.trains_backbone, f"trains_backbone={m.trains_backbone} but trainable says otherwise"
    frozen_before = {k: v.clone() for k, v in _backbone_state(net).items()}
    opt = torch.optim.Adam(trainable, lr=1e-3)
    net.train()
    first = m.loss(net(x), y, net)
    assert first.dim() == 0 and torch.isfinite(first), "loss must be a finite scalar"
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


def check_dynamic(cls: type[Method], backbone_name: str) -> None:
    m, net, x, y = built(cls, backbone_name)
    net.eval()
    trace = collect_trace(net, x, y)
    for score in m.scores:
        scores = trace.scores(score)
        thresholds = midpoint_thresholds(scores)
        expected_exit = first_exit(scores, torch.tensor([thresholds]))[0]
        expected_pred = trace.predictions().gather(0, expected_exit[None])[0]
        logits, exit_idx = net.forward_dynamic(x, ThresholdPolicy(score, thresholds))
        assert torch.equal(exit_idx, expected_exit), f"{score}: forward_dynamic exits differ from the trace's"
        assert torch.equal(logits.argmax(-1), expected_pred), f"{score}: predictions differ from the trace's"
        assert 0 < (exit_idx == 0).sum() < len(x), f"{score}: thresholds should send some samples on, not all"


def check_hparams(cls: type[Method], backbone_name: str | None = None) -> None:
    try:
        cls(no_such_hparam_xyz=1)
    except UserError as e:
        assert "unknown hyper-parameter" in str(e), str(e)
    else:
        raise AssertionError("an unknown hyper-parameter was accepted")
    assert cls.name and cls.hparams, "a method declares its name and hyper-parameters"
    for k, spec in cls.hparams.items():
        if spec.choices is not None:
            assert spec.default in spec.choices, f"{k}: default outside its choices"
            try:
                cls(**{k: "no-such-choice"})
            except UserError:
                continue
            raise AssertionError(f"{k}: a value outside its choices was accepted")


CHECKS: dict[str, Callable[..., None]] = {"build": check_build, "train": check_train, "dynamic": check_dynamic}
"""Per (method, backbone); ``check_hparams`` runs once per method."""


def run_checks(cls: type[Method], backbones: tuple[str, ...] = BACKBONES) -> list[tuple[str, str, str | None]]:
    """Every check on every backbone: (check, backbone, None if passed else the failure message)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny passes: one thread is faster on a shared CPU
    out: list[tuple[str, str, str | None]] = []
    try:
        for name, fn in [("hparams", check_hparams)]:
            out.append((name, "-", _outcome(fn, cls, None)))
        for b in backbones:
            for name, fn in CHECKS.items():
                out.append((name, b, _outcome(fn, cls, b)))
    finally:
        torch.set_num_threads(before)
    return out


def _outcome(fn, cls, backbone) -> str | None:
    try:
        fn(cls, backbone)
    except AssertionError as e:
        return str(e) or "assertion failed"
    except Exception as e:  # a crash in the plugin is a failed check, reported with its type
        return f"{type(e).__name__}: {e}"
    return None


__all__ = ["BACKBONES", "CHECKS", "built", "check_build", "check_dynamic", "check_hparams", "check_train",
           "midpoint_thresholds", "run_checks"]
