"""PTEENet: the cost-aware loss by hand, the frozen backbone, and a training step that helps."""

from __future__ import annotations

import pytest
import torch

from exitbench.methods.base import ExitOutputs, UserError, get_method
from exitbench.methods.losses import cost_aware_loss, cost_aware_mixture


def _outputs():
    p0 = torch.tensor([[2.0, 0.0, -1.0]])
    p1 = torch.tensor([[0.0, 1.0, 0.0]])
    p2 = torch.tensor([[0.5, 0.5, 3.0]])
    h = [torch.tensor([0.3]), torch.tensor([0.6]), torch.tensor([1.0])]
    return ExitOutputs([p0, p1, p2], h), torch.tensor([0.2, 0.5, 1.0])


def test_mixture_recursion_by_hand():
    out, c = _outputs()
    ys, cs = cost_aware_mixture(out, c)
    p = [lg.softmax(-1) for lg in out.logits]
    y1 = 0.6 * p[1] + 0.4 * p[2]
    y0 = 0.3 * p[0] + 0.7 * y1
    assert torch.allclose(ys[2], p[2]) and torch.allclose(ys[1], y1) and torch.allclose(ys[0], y0)
    c1 = 0.6 * 0.5 + 0.4 * 1.0
    assert torch.allclose(cs[1], torch.tensor([c1])) and torch.allclose(cs[0], torch.tensor([0.3 * 0.2 + 0.7 * c1]))


def test_v1_and_v2_by_hand():
    out, c = _outputs()
    y = torch.tensor([2])
    ys, cs = cost_aware_mixture(out, c)
    terms = [-ys[i][0, 2].log() + 1.5 * cs[i][0] for i in range(3)]
    assert torch.isclose(cost_aware_loss(out, y, c, 1.5, "v1", True), terms[0])
    assert torch.isclose(cost_aware_loss(out, y, c, 1.5, "v2", True), sum(terms) / 2)  # 1/N, N = 2 early exits
    assert torch.isclose(cost_aware_loss(out, y, c, 1.5, "v2", False), sum(terms))  # EENet: no 1/N


def test_loss_is_finite_when_the_true_class_underflows():
    out = ExitOutputs([torch.tensor([[200.0, -200.0]])] * 2, [torch.tensor([1.0]), torch.tensor([1.0])])
    loss = cost_aware_loss(out, torch.tensor([1]), torch.tensor([0.5, 1.0]), 1.0, "v1", True)
    assert torch.isfinite(loss)


def test_build_freezes_the_backbone_and_a_step_lowers_the_loss(tiny):
    m = get_method("pteenet")(n_exits=2, placement="pareto", lam=0.5)
    exits = m.place_exits(tiny)
    net = m.build(tiny, exits, tiny.num_classes)
    net.rel_costs = torch.tensor([0.5, 0.7, 1.0])
    assert all(not p.requires_grad for p in tiny.parameters())
    assert net.trainable_parameters() and all(p.requires_grad for p in net.heads[0].parameters())
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 5, (32,))
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    net.train()
    first = m.loss(net(x), y, net)
    for _ in range(5):
        loss = m.loss(net(x), y, net)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.loss(net(x), y, net) < first


def test_backbone_targets_use_the_final_exit():
    m = get_method("pteenet")(targets="backbone", loss="v1")
    out, c = _outputs()
    net = type("N", (), {"rel_costs": c})()
    assert torch.isclose(m.loss(out, torch.tensor([0]), net), cost_aware_loss(out, torch.tensor([2]), c, 1.0, "v1",
                                                                              True))


def test_bad_hparams():
    with pytest.raises(UserError, match="did you mean 'lam'"):
        get_method("pteenet")(lamda=1.0)
    with pytest.raises(UserError, match="not one of"):
        get_method("pteenet")(loss="v3")
