"""BranchyNet: the weighted joint loss by hand, the weights' reading of the paper, and the Adam betas."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from exitbench.methods.base import ExitOutputs, UserError, get_method
from exitbench.methods.branchynet import exit_weights


def _outputs():
    logits = [torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
              torch.tensor([[0.5, 0.5, 3.0], [-2.0, 4.0, 0.0]])]
    return ExitOutputs(logits), torch.tensor([2, 1])


def _ce(logits, y):
    """Mean cross-entropy written out: -log softmax of the true class."""
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    return -p[torch.arange(len(y)), y].log().mean()


def test_paper_weights_are_one_for_early_exits_and_point_three_for_the_final():
    assert exit_weights(4, "paper") == [1.0, 1.0, 1.0, 0.3]
    assert exit_weights(4, "equal") == [1.0] * 4


def test_loss_by_hand():
    out, y = _outputs()
    ce = [_ce(lg, y) for lg in out.logits]
    assert torch.isclose(ce[0], F.cross_entropy(out.logits[0], y))
    paper = get_method("branchynet")()
    assert torch.isclose(paper.loss(out, y, None), ce[0] + ce[1] + 0.3 * ce[2])
    equal = get_method("branchynet")(weights="equal")
    assert torch.isclose(equal.loss(out, y, None), ce[0] + ce[1] + ce[2])


def test_joint_training_and_the_papers_adam_betas(tiny):
    m = get_method("branchynet")(n_exits=2, placement="pareto", branch_depth=1)
    net = m.build(tiny, m.place_exits(tiny), tiny.num_classes)
    assert m.trains_backbone and all(p.requires_grad for p in tiny.parameters())
    assert all(h.confidence is None for h in net.heads[:-1]), "entropy exits: no confidence heads"
    assert m.budget().betas == (0.99, 0.999)
    assert get_method("branchynet")(betas=[0.9, 0.999]).budget().betas == (0.9, 0.999)  # YAML gives lists


def test_bad_hparams():
    with pytest.raises(UserError, match="not one of"):
        get_method("branchynet")(weights="paperish")
    with pytest.raises(UserError, match="betas"):
        get_method("branchynet")(betas=[0.9])
