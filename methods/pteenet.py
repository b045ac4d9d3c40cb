"""PTEENet: post-trained early-exit branches on a frozen pretrained backbone.

Paper: "Post-Training Early-Exit Neural Networks" (arXiv 2501.02508; IEEE Access 10:69680, 2022).
Reference code: github.com/spokV/PTEENET. Rule implemented (docs/METHODS.md): exits placed by cost,
conv2 branches with a classifier and a sigmoid confidence head, the backbone frozen *and kept in eval
mode*, a cost-aware loss built backwards from the final exit, exit at the first h_i > tau.

Deliberate departures from the reference code (its bugs): frozen BatchNorm statistics do not drift
and dropout does not run while branches train; exits are mixed in probability space and clamped
before the log; accuracy is always ground truth, with agreement reported separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.base import ExitOutputs, ExitPoint, HParam, Method, MultiExitNet, StagedBackbone, register_method
from methods.heads import ConvBranch

_EPS = 1e-7  # clamp before the log: a mixture can underflow to 0 for the true class


def cost_aware_mixture(outputs: ExitOutputs, rel_costs: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """EENet/PTEENet recursion from the final exit backwards, per sample:
    Y_N = p_N, C_N = 1; Y_i = h_i p_i + (1 - h_i) Y_{i+1}; C_i = h_i c_i + (1 - h_i) C_{i+1}.
    Returns the lists Y_0..Y_N (probabilities) and C_0..C_N (expected relative costs)."""
    assert outputs.confidence is not None, "cost-aware loss needs confidence heads"
    probs = [lg.float().softmax(-1) for lg in outputs.logits]
    y = probs[-1]
    c = torch.ones_like(outputs.confidence[-1], dtype=torch.float32) * rel_costs[-1]
    ys, cs = [y], [c]
    for i in range(len(probs) - 2, -1, -1):
        h = outputs.confidence[i].float()
        y = h[:, None] * probs[i] + (1 - h[:, None]) * y
        c = h * rel_costs[i] + (1 - h) * c
        ys.append(y)
        cs.append(c)
    return ys[::-1], cs[::-1]


def cost_aware_loss(outputs: ExitOutputs, target: Tensor, rel_costs: Tensor, lam: float, version: str,
                    normalise_v2: bool) -> Tensor:
    """Loss v1: NLL(log Y_0) + lam * mean(C_0). Loss v2: sum over i = 0..N of
    [NLL(log Y_i) + lam * mean(C_i)], divided by N (the number of early exits) when ``normalise_v2``
    (PTEENet) and not divided (EENet)."""
    ys, cs = cost_aware_mixture(outputs, rel_costs)
    terms = [torch.nn.functional.nll_loss(y.clamp_min(_EPS).log(), target) + lam * c.mean()
             for y, c in zip(ys, cs)]
    if version == "v1":
        return terms[0]
    total = torch.stack(terms).sum()
    return total / (len(ys) - 1) if normalise_v2 else total


@register_method
class PTEENet(Method):
    """Post-trained conv branches with learned confidence on a frozen backbone."""

    name = "pteenet"
    version = "1"
    score = "confidence"
    scores = ("confidence", "max_softmax", "neg_entropy")
    trains_backbone = False
    hparams = {
        "n_exits": HParam(3, "number of early exits"),
        "placement": HParam("fine", "fine | pareto | linear | gold_ratio | list of block names or cost fractions"),
        "branch_depth": HParam(2, "conv blocks in a branch (0 = pool head; conv2 is the paper's)",
                               (0, 1, 2, 3)),
        "loss": HParam("v2", "v1: loss on the mixture at exit 0; v2: mean over all exits", ("v1", "v2")),
        "lam": HParam(1.0, "lambda: weight of the expected-cost term"),
        "targets": HParam("labels", "labels (ground truth) or backbone (its argmax)", ("labels", "backbone")),
        "tau": HParam(0.5, "inference threshold on the confidence (exit when h > tau)"),
        "epochs": HParam(10, "training epochs"),
        "lr": HParam(1e-3, "Adam learning rate"),
        "batch_size": HParam(128, "training batch size"),
        "weight_decay": HParam(0.0, "Adam weight decay"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        heads = [ConvBranch(e, num_classes, depth=int(self.hp["branch_depth"])) for e in exits]
        return MultiExitNet(backbone, exits, heads, freeze_backbone=True)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet) -> Tensor:
        if self.hp["targets"] == "backbone":
            target = outputs.logits[-1].detach().argmax(-1)
        return cost_aware_loss(outputs, target, net.rel_costs, float(self.hp["lam"]), self.hp["loss"],
                               normalise_v2=True)

    def default_thresholds(self) -> float:
        return float(self.hp["tau"])
