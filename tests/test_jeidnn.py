"""JEI-DNN: the gate's inputs, exit probabilities, targets and loss by hand on tiny tensors; the identity
behind the IM loss; the bi-level phase schedule; the carry through every way of running the net; and a
trained net whose trade-off really moves its exits."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from exitbench.benchmarks.fast import FastForward, buckets_for
from exitbench.benchmarks.training import method_trainer
from exitbench.benchmarks.variants import full_select_forward, masked_forward
from exitbench.methods.base import ExitOutputs, get_method
from exitbench.methods.jeidnn import (
    BilevelLoss,
    JEIDNNNet,
    exit_probabilities,
    gate_loss,
    gate_targets,
    uncertainty_features,
)
from exitbench.methods.policies import ThresholdPolicy
from tests.conftest import midpoint_thresholds, tiny_backbone

CLASSES = 5


def _net(n_exits: int = 3, **hp) -> tuple[object, JEIDNNNet]:
    torch.manual_seed(0)
    bb = tiny_backbone(CLASSES, side=16)
    m = get_method("jeidnn")(n_exits=n_exits, placement=[c.name for c in bb.candidates[:n_exits]], **hp)
    net = m.build(bb, m.place_exits(bb), CLASSES).eval()
    net.rel_costs.copy_(torch.tensor([0.25, 0.5, 0.75, 1.0][-(n_exits + 1):]))
    return m, net


def test_uncertainty_features_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    u = uncertainty_features(p.log())
    sq = p.square() / p.square().sum()
    entropy = -(p * p.log()).sum()
    entropy_sq = -(sq * sq.log()).sum()
    assert torch.allclose(u, torch.tensor([[0.5, entropy, 0.2, entropy_sq]]), atol=1e-6)
    logits = torch.randn(4, 3, requires_grad=True)
    assert not uncertainty_features(logits).requires_grad  # the gate never trains the IM


def test_exit_probabilities_by_hand_and_as_the_reference_computes_them():
    g = [torch.tensor([0.2, 0.7, 0.3]), torch.tensor([0.5, 0.6, 0.2]), torch.tensor([0.9, 0.1, 0.4])]
    spent, ps, as_ = torch.zeros(3), [], []
    ref_prob, ref_remaining = [], torch.ones(3)  # the reference: P_k / prod (1 - a_j), clipped
    for gk in g:
        p, a = exit_probabilities(gk, spent)
        ps.append(p)
        as_.append(a)
        ref_prob.append((torch.minimum(gk, 1 - spent).clamp_min(0) / ref_remaining).clamp(0, 1))
        ref_remaining = ref_remaining * (1 - ref_prob[-1])
        spent = spent + gk
    ps, as_ = torch.stack(ps), torch.stack(as_)
    # sample 0: P = 0.2, 0.5, min(0.9, 0.3) = 0.3; a = 0.2, 0.5/0.8, 0.3/0.3 = 1
    assert torch.allclose(ps[:, 0], torch.tensor([0.2, 0.5, 0.3]))
    assert torch.allclose(as_[:, 0], torch.tensor([0.2, 0.625, 1.0]))
    # sample 1: P = 0.7, min(0.6, 0.3) = 0.3, 0; a = 0.7, 1, then 1 (nothing is left; the reference: 0/0)
    assert torch.allclose(ps[:, 1], torch.tensor([0.7, 0.3, 0.0]))
    assert torch.allclose(as_[:, 1], torch.tensor([0.7, 1.0, 1.0]))
    # sample 2: no clipping, a_k = g_k / (1 - sum of earlier g)
    assert torch.allclose(as_[:, 2], torch.tensor([0.3, 0.2 / 0.7, 0.4 / 0.5]))
    ref = torch.stack(ref_prob)
    assert torch.allclose(as_[:, [0, 2]], ref[:, [0, 2]], atol=1e-6) and torch.allclose(as_[:2, 1], ref[:2, 1])
    assert torch.isnan(ref[2, 1])  # where ours reads 1


def test_run_head_outputs_the_conditional_exit_probability_and_carries_it():
    _, net = _net(3)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out = net.forward_all(x)
        feats, spent = x, torch.zeros(6)
        for k in range(3):
            feats = net.stages[k](feats)
            logits = net.heads[k](feats)
            g = torch.sigmoid(net.gates[k].linear(uncertainty_features(logits))).squeeze(-1)
            a = torch.where(g >= 1 - spent, 1.0, g / (1 - spent))
            assert torch.allclose(out.logits[k], logits) and torch.allclose(out.confidence[k], a, atol=1e-6)
            spent = spent + g
    assert torch.equal(out.confidence[-1], torch.ones(6))


def test_gate_targets_and_balanced_loss_by_hand():
    ce = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.1, 0.05, 0.0, 0.0], [2.0, 2.0, 2.0, 0.1]])
    costs = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert gate_targets(ce, costs, 0.0).tolist() == [3, 2, 3]  # argmin CE (ties: the earliest)
    t = gate_targets(ce, costs, 1.0)  # + cost: 1.15, 1.0, 0.85, 1.0 | 0.35, ... | 2.25, 2.5, 2.75, 1.1
    assert t.tolist() == [2, 0, 3]
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.5, 0.0], [-1.0, -2.0, 0.5]])
    z = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # per gate: #1 = 1, 1, 2 and #0 = 2, 2, 1, so the positives weigh 2, 2, 0.5
    w = z * torch.tensor([2.0, 2.0, 0.5]) + (1 - z)
    expected = (F.binary_cross_entropy_with_logits(logits, z, reduction="none") * w).mean()
    assert torch.allclose(gate_loss(logits, t), expected)
    # every sample should leave at exit 0: no negatives anywhere, positives weigh 1 (not 0)
    everyone = torch.zeros(3, dtype=torch.long)
    assert torch.allclose(gate_loss(logits, everyone), F.binary_cross_entropy_with_logits(logits, torch.ones(3, 3)))
    # rare positives: the weight is capped at 5
    rare = torch.tensor([0] + [3] * 9)
    lg = torch.zeros(10, 3)
    zz = torch.zeros(10, 3)
    zz[0] = 1
    assert torch.allclose(gate_loss(lg, rare), (F.binary_cross_entropy_with_logits(lg, zz, reduction="none")
                                                * (zz * 5 + (1 - zz))).mean())


def test_the_references_weighted_im_loss_is_the_mean_cross_entropy():
    """The reference's IM loss, mean(P * L * sum(L) / sum(P * L)) with the gradient through the ratio, has the
    value and the gradient of the plain mean CE over the early IMs -- which is what JEIDNN.loss computes."""
    torch.manual_seed(1)
    logits = [torch.randn(8, CLASSES, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, CLASSES, (8,))
    p = torch.rand(8, 3)  # detached exit probabilities (the gates are fixed in this phase)
    ce = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits], 1)
    reference = (p * ce * (ce.sum(1) / (p * ce).sum(1))[:, None]).mean()
    ref_grads = torch.autograd.grad(reference, logits)
    m = get_method("jeidnn")()
    ours = m.loss(ExitOutputs([*logits, torch.zeros(8, CLASSES)]), y)
    assert torch.allclose(reference, ours, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref_grads, torch.autograd.grad(ours, logits)))


def test_warmup_loss_weights_earlier_ims_more():
    m = get_method("jeidnn")()
    logits = [torch.randn(4, CLASSES) for _ in range(4)]
    y = torch.tensor([0, 1, 2, 3])
    expected = sum((4 - k) * F.cross_entropy(lg, y) for k, lg in enumerate(logits[:3]))
    assert torch.allclose(m.warmup_loss(ExitOutputs(logits), y), expected)


@pytest.mark.parametrize(("per_epoch", "every", "phases"), [
    (4, 2, ["gates", "gates", "ims", "ims", "gates", "gates", "ims", "ims"]),
    (4, 200, ["gates"] * 4 + ["ims"] * 4),  # fewer batches than a phase: the phase flips at each epoch's start
    (3, 1, ["gates", "ims", "gates", "ims", "gates", "ims"]),
])
def test_bilevel_schedule(per_epoch, every, phases):
    _, net = _net(2)
    m = get_method("jeidnn")()
    loss = BilevelLoss(m, per_epoch, every)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, CLASSES, (4,))
    seen = []
    for _ in phases:
        net.zero_grad(set_to_none=True)
        loss(net(x), y, net).backward()
        ims = any(p.grad is not None for h in net.heads[:-1] for p in h.parameters())
        gates = any(p.grad is not None for p in net.gates.parameters())
        assert ims != gates, "exactly one side trains in a phase"
        seen.append("ims" if ims else "gates")
        assert seen[-1] == loss.phase
    assert seen == phases
    assert loss.batches == {"gates": phases.count("gates"), "ims": phases.count("ims")}


def _policy(net, x):
    with torch.no_grad():
        scores = torch.stack(net.forward_all(x).confidence[:-1])
    return ThresholdPolicy("confidence", midpoint_thresholds(scores))


@pytest.mark.parametrize("forward", [masked_forward, full_select_forward], ids=["masking", "full+select"])
def test_compaction_carries_the_gates_state(forward):
    _, net = _net(3)
    with torch.no_grad():  # spread the gates so samples leave at every exit
        for gate in net.gates:
            gate.linear.weight.normal_(0, 3)
    x = torch.randn(48, 3, 16, 16)
    policy = _policy(net, x)
    logits, exits = net.forward_dynamic(x, policy)
    assert len(set(exits.tolist())) >= 3
    ref_logits, ref_exits = forward(net, x, policy)
    assert torch.equal(exits, ref_exits) and torch.allclose(logits, ref_logits, atol=1e-5)
    fast_logits, fast_exits = FastForward(net, "compile", buckets_for(len(x)))(x, policy)
    assert torch.equal(fast_exits, exits) and torch.allclose(fast_logits, logits, atol=1e-4)


def _loaders(n: int = 96, batch: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += y[:, None, None].float()  # learnable: the class shifts the first channel
    data = TensorDataset(x, y)
    return {"train": DataLoader(data, batch_size=batch), "calibration": DataLoader(data, batch_size=batch)}


def test_fit_warms_up_then_alternates_and_leaves_the_backbone_alone():
    m, net = _net(2, warmup_epochs=1, epochs=2, bilevel_batches=3, batch_size=16, optimizer="adam", lr=1e-2)
    loaders = _loaders()
    frozen = {k: v.clone() for k, v in net.stages.state_dict().items()}
    gates = [p.detach().clone() for p in net.gates.parameters()]
    ims = [p.detach().clone() for p in net.heads[0].parameters()]
    stats = m.fit(net, loaders, m.budget(), method_trainer)
    assert list(stats["phases"]) == ["warmup", "bilevel"] and stats["epochs_run"] == 3
    assert len(stats["loss_per_epoch"]) == 3
    # 6 batches per epoch, a switch every 3: gates 3, ims 3, in each of the 2 epochs
    assert stats["bilevel_batches"] == {"gates": 6, "ims": 6}
    assert all(torch.equal(v, frozen[k]) for k, v in net.stages.state_dict().items())
    assert not any(torch.equal(a, b) for a, b in zip(gates, net.gates.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(ims, net.heads[0].parameters()))


def test_a_larger_trade_off_exits_earlier():
    """lam = 0 targets the most accurate exit, lam = 10 the cheapest: the trained gates follow."""
    mean_exit = {}
    for lam in (0.0, 10.0):
        m, net = _net(2, warmup_epochs=2, epochs=4, bilevel_batches=2, batch_size=16, optimizer="adam", lr=2e-2,
                      lam=lam)
        m.fit(net, _loaders(), m.budget(), method_trainer)
        x = next(iter(_loaders(96, 96)["train"]))[0]
        with torch.no_grad():
            _, exits = net.forward_dynamic(x, ThresholdPolicy.shared("confidence", m.default_thresholds(), 2,
                                                                     strict=True))
        mean_exit[lam] = exits.float().mean().item()
    # lam = 10: every target is exit 0, and every sample leaves there; lam = 0: many go on
    assert mean_exit[10.0] == 0.0 and mean_exit[0.0] > 0.2, mean_exit
