"""The plugin contract: exit placement, multi-exit nets, the real dynamic forward, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitbench.benchmarks.traces import collect_trace
from exitbench.methods.base import (
    METHODS,
    HParam,
    Method,
    MultiExitNet,
    UserError,
    get_method,
    list_methods,
    place_exits,
)
from exitbench.methods.heads import ConvBranch
from exitbench.methods.policies import ThresholdPolicy, first_exit
from tests.conftest import midpoint_thresholds, tiny_backbone


def test_placement_distributions_and_explicit_lists(tiny):
    c = tiny.candidates
    # cumulative MACs of the tiny backbone: 55.3k, 202.8k, 276.5k of 424.0k -> fractions .130 .478 .652
    assert [e.name for e in place_exits(c, tiny.macs, 1, "linear")] == ["b2"]  # T = 1/2
    assert [e.name for e in place_exits(c, tiny.macs, 2, "pareto")] == ["b1", "b2"]  # T = .2, .36
    assert [e.name for e in place_exits(c, tiny.macs, 1, "fine")] == ["b0"]  # T = .05
    assert [e.name for e in place_exits(c, tiny.macs, 2, ["b0", "b2"])] == ["b0", "b2"]
    assert [e.name for e in place_exits(c, tiny.macs, 2, [0.1, 0.4])] == ["b0", "b1"]
    with pytest.raises(UserError, match="exit 1 needs"):
        place_exits(c, tiny.macs, 2, "linear")  # T = 1/3 -> b1, then 2/3: nothing left after b1


@pytest.mark.parametrize("placement, match", [
    ("lnear", "did you mean 'linear'"),
    (["b9"], "no exit point named 'b9'"),
    (["b2", "b1"], "depth order"),
    ([0.9], "fewer exits"),
])
def test_impossible_placements_are_user_errors(tiny, placement, match):
    with pytest.raises(UserError, match=match):
        place_exits(tiny.candidates, tiny.macs, 3, placement)


def test_too_many_exits_is_a_user_error(tiny):
    with pytest.raises(UserError, match="n_exits"):
        place_exits(tiny.candidates, tiny.macs, 4, "fine")


def _net(bb, exits=(0, 2), confidence=True):
    ex = [bb.candidates[i] for i in exits]
    return MultiExitNet(bb, ex, [ConvBranch(e, bb.num_classes, depth=1, confidence=confidence) for e in ex]).eval()


def test_forward_all_final_exit_is_the_backbone(tiny):
    x = torch.randn(6, 3, 16, 16)
    out = _net(tiny).forward_all(x)
    assert len(out.logits) == 3 and [lg.shape for lg in out.logits] == [(6, 5)] * 3
    assert torch.allclose(out.logits[-1], tiny(x), atol=1e-6)
    assert out.confidence is not None and torch.all(out.confidence[-1] == 1)
    assert all(((c > 0) & (c < 1)).all() for c in out.confidence[:-1])




@pytest.mark.parametrize("score", ["max_softmax", "neg_entropy", "confidence"])
def test_forward_dynamic_equals_the_trace(tiny, score):
    net = _net(tiny)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,))
    trace = collect_trace(net, x, y, batch_size=64)
    scores = trace.scores(score)
    thresholds = midpoint_thresholds(scores)
    expected_exit = first_exit(scores, torch.tensor([thresholds]))[0]
    expected_pred = trace.predictions().gather(0, expected_exit[None])[0]
    logits, exit_idx = net.forward_dynamic(x, ThresholdPolicy(score, thresholds))
    assert torch.equal(exit_idx, expected_exit)
    assert torch.equal(logits.argmax(-1), expected_pred)
    assert 0 < (exit_idx < 2).sum() < 64, "the thresholds should send some samples early, not all"


def test_forward_dynamic_really_stops_early(tiny):
    """Later stages see only the samples that did not leave."""
    net = _net(tiny)
    seen = []
    net.stages[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = torch.randn(32, 3, 16, 16)
    _, idx = net.forward_dynamic(x, ThresholdPolicy("max_softmax", (0.0, 0.0)))  # everyone leaves at exit 0
    assert torch.all(idx == 0) and seen == []
    _, idx = net.forward_dynamic(x, ThresholdPolicy("max_softmax", (float("inf"),) * 2))  # nobody leaves
    assert torch.all(idx == 2) and seen == [32]
    thr = midpoint_thresholds(collect_trace(net, x, torch.zeros(32, dtype=torch.long)).scores("max_softmax"))
    seen.clear()
    _, idx = net.forward_dynamic(x, ThresholdPolicy("max_softmax", thr))
    assert seen == [int((idx == 2).sum())] and 0 < seen[0] < 32


def test_frozen_backbone_stays_in_eval_mode_while_heads_train(tiny):
    ex = [tiny.candidates[1]]
    net = MultiExitNet(tiny, ex, [ConvBranch(ex[0], 5)], freeze_backbone=True)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    net.train()
    assert all(not m.training for m in net.stages.modules()) and net.heads[0].training
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.1)
    out = net.forward_all(torch.randn(8, 3, 16, 16))
    (out.logits[0].sum() + out.logits[-1].sum()).backward()
    opt.step()
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone changed"
    assert all(not p.requires_grad for p in tiny.parameters())


def test_registry_finds_builtins_through_entry_points_and_suggests_names():
    assert "pteenet" in list_methods()
    assert get_method("pteenet").name == "pteenet"
    with pytest.raises(UserError, match="did you mean 'pteenet'"):
        get_method("pteenett")


def test_a_registered_plugin_is_listed_and_checks_its_hparams():
    @METHODS.register()
    class Toy(Method):
        name = "toy_plugin_for_test"
        hparams = {"n_exits": HParam(1), "mode": HParam("a", choices=("a", "b"))}

        def build(self, backbone, exits, num_classes):
            return MultiExitNet(backbone, exits, [nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))])

    assert "toy_plugin_for_test" in list_methods() and get_method("toy_plugin_for_test") is Toy
    with pytest.raises(UserError, match="did you mean 'mode'"):
        Toy(mod="a")
    with pytest.raises(UserError, match="not one of"):
        Toy(mode="c")
    assert [e.name for e in Toy().place_exits(tiny_backbone())] == ["b0"]


def test_an_entry_point_named_unlike_its_class_is_refused(monkeypatch):
    from exitbench.methods import base

    monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))
    base.METHODS.register("pte", "exitbench.methods.pteenet:PTEENet")  # as an entry point would declare it
    with pytest.raises(UserError, match="loads a class named 'pteenet'; make the entry-point name"):
        base.get_method("pte")


def test_hparams_are_typed_and_ranged():
    from exitbench.methods.pteenet import PTEENet

    assert type(PTEENet(epochs=2.0).hp["epochs"]) is int  # an integral float is an int
    for kw, message in (({"lr": "1e-3"}, "YAML reads 1e-3 as text: write it with a dot"),
                        ({"lr": 0.0}, "lr=0.0: must be > 0"), ({"epochs": 2.5}, "expected an integer"),
                        ({"tau": 1.5}, "tau=1.5: must be <= 1"), ({"lam": -1}, "lam=-1: must be >= 0"),
                        ({"batch_size": 0}, "batch_size=0: must be >= 1")):
        with pytest.raises(UserError, match=message):
            PTEENet(**kw)
