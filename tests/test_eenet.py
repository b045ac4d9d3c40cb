"""EENet: loss v2 without the 1/N factor (by hand), the heads (bnpool's BatchNorm is registered),
tau."""

from __future__ import annotations

import copy

import torch

from exitbench.methods.base import ExitOutputs, get_method
from exitbench.methods.heads import BNPoolBranch, ConvBranch
from exitbench.methods.losses import cost_aware_mixture


def _outputs():
    logits = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 3.0]])]
    h = [torch.tensor([0.3]), torch.tensor([0.6]), torch.tensor([1.0])]
    return ExitOutputs(logits, h), torch.tensor([0.2, 0.5, 1.0])


def _net(costs):
    return type("Net", (), {"rel_costs": costs})()


def test_loss_v2_is_the_sum_over_exits_and_v1_the_first_term():
    out, c = _outputs()
    y = torch.tensor([2])
    p = [lg.softmax(-1)[0] for lg in out.logits]
    y1 = 0.6 * p[1] + 0.4 * p[2]
    y0 = 0.3 * p[0] + 0.7 * y1
    c1 = 0.6 * 0.5 + 0.4 * 1.0
    c0 = 0.3 * 0.2 + 0.7 * c1
    terms = [-y0[2].log() + 2.0 * c0, -y1[2].log() + 2.0 * c1, -p[2][2].log() + 2.0 * 1.0]
    assert torch.isclose(get_method("eenet")(lam=2.0).loss(out, y, _net(c)), sum(terms))  # no 1/N (PTEENet has it)
    assert torch.isclose(get_method("eenet")(lam=2.0, loss="v1").loss(out, y, _net(c)), terms[0])
    ys, cs = cost_aware_mixture(out, c)
    assert torch.allclose(ys[0][0], y0) and torch.isclose(cs[0][0], torch.tensor(c0))


def test_heads_and_default_threshold(tiny):
    exits = [tiny.candidates[0]]
    for kind, cls, body in (("pool", ConvBranch, 0), ("bnpool", BNPoolBranch, 2), ("conv2", ConvBranch, 6)):
        head = get_method("eenet")(n_exits=1, head=kind).build(tiny, exits, 5).heads[0]
        assert type(head) is cls and head.confidence is not None and len(head.body) == body
    assert get_method("eenet")().default_thresholds() == 0.5
    assert get_method("eenet")(tau=0.8).default_thresholds() == 0.8


def test_bnpool_batchnorm_is_registered_and_trains(tiny):
    head = BNPoolBranch(tiny.candidates[0], 5)
    bn = head.body[0]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert any(p is bn.weight for p in head.parameters()), "BN affine parameters must be trainable"
    assert "body.0.running_mean" in head.state_dict(), "BN statistics must be saved"
    before = bn.running_mean.clone()
    head.train()(torch.randn(4, 8, 16, 16) + 3)
    assert not torch.equal(before, bn.running_mean)


def test_joint_training_keeps_the_given_backbone_trainable(tiny):
    weight = tiny.blocks[1][0].weight.detach().clone()
    net = get_method("eenet")(n_exits=1).build(copy.deepcopy(tiny), [tiny.candidates[0]], 5)
    assert torch.equal(net.stages[1][0][0].weight, weight)
    assert all(p.requires_grad for p in net.stages.parameters())
