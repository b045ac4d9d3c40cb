"""ZTW: the cascading wiring, the geometric ensemble by hand, the ensemble weights' shapes, the two training
phases, the carry through every way of running the net (compaction, masking, the fast path, the profile)
and the MACs the cascading Linear adds."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from exitbench.benchmarks.accounting import profile
from exitbench.benchmarks.fast import FastForward, buckets_for
from exitbench.benchmarks.flops import exit_head_macs
from exitbench.benchmarks.training import method_trainer
from exitbench.benchmarks.variants import batch_uniform_forward, full_select_forward, masked_forward
from exitbench.methods.base import ExitOutputs, get_method
from exitbench.methods.policies import ThresholdPolicy
from exitbench.methods.ztw import CascadingHead, GeometricEnsemble, ZTWNet
from tests.conftest import midpoint_thresholds, tiny_backbone

CLASSES = 5


def _net(n_exits: int = 3, **hp) -> tuple[object, ZTWNet]:
    torch.manual_seed(0)
    bb = tiny_backbone(CLASSES, side=16)
    m = get_method("ztw")(n_exits=n_exits, placement=[c.name for c in bb.candidates[:n_exits]], **hp)
    return m, m.build(bb, m.place_exits(bb), CLASSES).eval()


def test_geometric_ensemble_by_hand():
    ens = GeometricEnsemble(num_heads=2, num_classes=3)
    with torch.no_grad():
        ens.weight.copy_(torch.tensor([0.0, 0.5]).reshape(1, 2, 1))
        ens.bias.copy_(torch.tensor([[0.1, -0.2, 0.0]]))
    logp = torch.log_softmax(torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]]), dim=-1)  # [B=1, heads=2, C=3]
    expected = (logp[0, 0] * 1.0 + logp[0, 1] * torch.tensor(0.5).exp()) / 2 + torch.tensor([0.1, -0.2, 0.0])
    assert torch.allclose(ens(logp)[0], expected, atol=1e-6)


def test_ensemble_weights_have_one_weight_per_earlier_head():
    _, net = _net(3)
    assert [tuple(e.weight.shape) for e in net.ensembles] == [(1, 1, 1), (1, 2, 1), (1, 3, 1)]
    assert all(tuple(e.bias.shape) == (1, CLASSES) for e in net.ensembles)
    assert all(e.weight.abs().max() < 0.1 and not e.bias.any() for e in net.ensembles)  # N(0, 0.01), zeros


def test_cascading_heads_read_the_previous_logits_detached_and_normalised():
    _, net = _net(3)
    heads = net.heads[:-1]
    assert heads[0].norm is None and heads[0].classifier.in_features == 8 * 16  # 8 channels pooled to 4x4
    assert all(h.cascading and h.norm is not None for h in heads[1:])
    assert heads[1].classifier.in_features == 8 * 16 + CLASSES and heads[2].classifier.in_features == 16 * 16 + CLASSES
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        f0 = net.stages[0](x)
        f1 = net.stages[1](f0)
    prev = torch.randn(4, CLASSES, requires_grad=True)
    out = heads[1](f1, prev)
    by_hand = heads[1].classifier(torch.cat([heads[1].pool(f1).flatten(1), F.layer_norm(prev, (CLASSES,),
                                                                                        heads[1].norm.weight,
                                                                                        heads[1].norm.bias)], -1))
    assert torch.allclose(out, by_hand, atol=1e-6)
    out.sum().backward()
    assert prev.grad is None, "the cascading input must be detached"
    assert not torch.allclose(heads[1](f1, prev + 1.0), heads[1](f1, prev * 3.0))  # it really reads it
    with pytest.raises(ValueError, match="previous head"):
        heads[1](f1)


def test_forward_all_chains_heads_and_ensembles():
    _, net = _net(3)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out = net.forward_all(x)
        feats, raw = x, []
        for k in range(3):
            feats = net.stages[k](feats)
            raw.append(net.heads[k](feats, raw[-1] if raw else None))
        logp = torch.stack([r.log_softmax(-1) for r in raw], 1)
        for k in range(3):
            assert torch.allclose(out.logits[k], net.ensembles[k](logp[:, : k + 1]), atol=1e-6)
        final = net.heads[3](net.stages[3](feats))
        assert torch.allclose(out.logits[3], final, atol=1e-6)  # the backbone's head is not ensembled
        net.ensembling = False
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.forward_all(x).logits[:3], raw))


def _policy(net, x):
    with torch.no_grad():
        scores = torch.stack([lg.softmax(-1).amax(-1) for lg in net.forward_all(x).logits[:-1]])
    return ThresholdPolicy("max_softmax", midpoint_thresholds(scores))


@pytest.mark.parametrize("forward", [masked_forward, full_select_forward], ids=["masking", "full+select"])
def test_compaction_carries_the_right_rows(forward):
    _, net = _net(3)
    x = torch.randn(40, 3, 16, 16)
    policy = _policy(net, x)
    logits, exits = net.forward_dynamic(x, policy)
    assert len(set(exits.tolist())) >= 3  # samples leave at different exits, so the carry was compacted
    ref_logits, ref_exits = forward(net, x, policy)
    assert torch.equal(exits, ref_exits) and torch.allclose(logits, ref_logits, atol=1e-5)
    logits_bu, exits_bu = batch_uniform_forward(net, x, policy)
    assert (exits_bu >= exits.min()).all() and logits_bu.shape == logits.shape


def test_the_fast_path_carries_and_pads_the_cascade():
    _, net = _net(3)
    x = torch.randn(44, 3, 16, 16)
    policy = _policy(net, x)
    ref_logits, ref_exits = net.forward_dynamic(x, policy)
    logits, exits = FastForward(net, "compile", buckets_for(len(x)))(x, policy)
    assert torch.equal(exits, ref_exits) and torch.allclose(logits, ref_logits, atol=1e-4)


def test_profile_times_every_exit_with_its_carry():
    _, net = _net(2)
    prof = profile(net, torch.randn(8, 3, 16, 16), [8], repeats=1, gate=ThresholdPolicy("max_softmax", (2.0, 2.0)))
    assert len(prof["head_ms"]) == 3 and all(t > 0 for row in prof["head_ms"] for t in row)


def test_cascading_linear_adds_its_inputs_macs():
    _, net = _net(3)
    macs = exit_head_macs(net, net.exits)
    linear = [h.classifier for h in net.heads[:-1]]
    # pooling and the ensemble are not counted (elementwise); each Linear is in x out + bias
    assert macs == [lin.in_features * CLASSES + CLASSES for lin in linear]
    assert linear[1].in_features == 8 * 16 + CLASSES


def test_two_phases_train_heads_then_ensembles_only():
    m, net = _net(2, epochs=1, ensemble_epochs=1, batch_size=16)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (64,), generator=g))
    loaders = {"train": DataLoader(data, batch_size=16), "calibration": DataLoader(data, batch_size=16)}
    seen = []

    def trainer(model, loss_fn, params, loaders, budget):
        seen.append(({id(p) for p in params}, model.ensembling, budget))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = method_trainer(model, loss_fn, params, loaders, budget)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        seen[-1] = (*seen[-1], changed)
        return stats

    stats = m.fit(net, loaders, m.budget(), trainer)
    (p1, ens1, b1, changed1), (p2, ens2, b2, changed2) = seen
    heads = {id(p) for h in net.heads[:-1] for p in h.parameters()}
    assert p1 == heads and not ens1 and b1.lr == 5e-3 and b1.weight_decay == 1e-4
    assert p2 == {id(p) for p in net.ensembles.parameters()} and ens2 and b2.lr == 1e-3 and b2.weight_decay == 0
    assert changed1 and all(n.startswith("heads.") for n in changed1)
    assert changed2 and all(n.startswith("ensembles.") for n in changed2)
    assert set(stats["phases"]) == {"cascading", "ensembling"} and stats["epochs_run"] == 2
    assert stats["seconds"] == pytest.approx(sum(s["seconds"] for s in stats["phases"].values()))


def test_loss_is_the_mean_cross_entropy_over_exits():
    logits = [torch.randn(4, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    expected = sum(F.cross_entropy(lg, y) for lg in logits) / 3
    assert torch.isclose(get_method("ztw")().loss(ExitOutputs(logits), y, None), expected)


def test_first_head_is_not_cascading():
    from exitbench.methods.base import ExitPoint

    head = CascadingHead(ExitPoint(0, "b", 8, (8, 3, 3), 1), CLASSES, cascading=False)
    assert head.norm is None and head(torch.randn(2, 8, 3, 3)).shape == (2, CLASSES)
