"""SDN: the internal classifier's mixed pooling by hand, the IC-only loss, the frozen backbone."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from exitbench.methods.base import ExitOutputs, ExitPoint, UserError, get_method
from exitbench.methods.heads import MixedPool, SDNHead


def test_mixed_pooling_by_hand():
    pool = MixedPool(in_side=8, size=4)
    with torch.no_grad():
        pool.alpha.fill_(0.3)
    x = torch.randn(2, 3, 8, 8)
    blocks = x.reshape(2, 3, 4, 2, 4, 2)  # 2x2 windows
    expected = 0.3 * blocks.amax(dim=(3, 5)) + 0.7 * blocks.mean(dim=(3, 5))
    assert torch.allclose(pool(x), expected, atol=1e-6)


def test_alpha_is_learned_and_initialised_in_unit_interval():
    pool = MixedPool(in_side=16)
    assert pool.alpha.requires_grad and 0 <= pool.alpha.item() < 1
    pool(torch.randn(2, 3, 16, 16)).sum().backward()
    assert pool.alpha.grad is not None and pool.alpha.grad.abs().item() > 0


def test_small_maps_are_not_pooled_and_tokens_are_laid_on_a_grid():
    small = SDNHead(ExitPoint(0, "b", 8, (8, 3, 3), 1), 5)
    assert small.pool.alpha is None and small.classifier.in_features == 8 * 9
    assert small(torch.randn(2, 8, 3, 3)).shape == (2, 5)
    vit = SDNHead(ExitPoint(0, "blocks.0", 16, (65, 16), 1, prefix_tokens=1), 5)  # 64 patches -> 8x8 -> 4x4
    assert vit.classifier.in_features == 16 * 16
    assert vit(torch.randn(2, 65, 16)).shape == (2, 5)


def test_loss_is_the_sum_of_early_exit_cross_entropies():
    logits = [torch.randn(4, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    expected = F.cross_entropy(logits[0], y) + F.cross_entropy(logits[1], y)  # the final exit takes no loss
    assert torch.isclose(get_method("sdn")().loss(ExitOutputs(logits), y, None), expected)


def test_build_freezes_the_backbone_in_eval_mode(tiny):
    m = get_method("sdn")(n_exits=2, placement="pareto")
    net = m.build(tiny, m.place_exits(tiny), 5).train()
    assert not net.stages.training and all(not p.requires_grad for p in tiny.parameters())
    assert all(isinstance(h, SDNHead) for h in net.heads[:-1])
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for h in net.heads[:-1] for p in h.parameters()}


@pytest.mark.parametrize("bad, why", [(0, "must be >= 1"), (-3, "must be >= 1"), (2.5, "expected an integer"),
                                      (True, "expected an integer"), ("4", "expected an integer"),
                                      (None, "expected an integer"), (float("inf"), "expected a finite number")])
def test_bad_pool_size(bad, why):
    # the shared HParam check (COMMON_RANGES: an integer >= 1) is the only guard; SDN has no check of its own
    with pytest.raises(UserError, match=f"pool_size={bad!r}: {why}"):
        get_method("sdn")(pool_size=bad)


def test_integral_pool_size_becomes_an_int():
    m = get_method("sdn")(pool_size=2.0)
    assert m.hp["pool_size"] == 2 and type(m.hp["pool_size"]) is int


def test_the_final_exit_joins_the_loss_when_the_regime_trains_the_backbone(tiny):
    m = get_method("sdn")(n_exits=2, placement="pareto")
    net = m.build(tiny, m.place_exits(tiny), 5)
    logits = [torch.randn(4, 5) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    early = F.cross_entropy(logits[0], y) + F.cross_entropy(logits[1], y)
    assert torch.isclose(m.loss(ExitOutputs(logits), y, net), early)  # frozen: IC-only
    net.set_backbone_frozen(False)  # regime mixed or joint
    assert torch.isclose(m.loss(ExitOutputs(logits), y, net), early + F.cross_entropy(logits[2], y))
    assert all(p.requires_grad for p in net.stages.parameters()) and net.train().stages.training
