"""PTEENet: post-trained early-exit branches on a frozen pretrained backbone.

Paper: "Post-Training Early-Exit Neural Networks" (arXiv 2501.02508; IEEE Access 10:69680, 2022).
Reference code: github.com/spokV/PTEENET. Rule implemented: exits placed by cost,
conv2 branches with a classifier and a sigmoid confidence head, the backbone frozen *and kept in eval
mode*, a cost-aware loss built backwards from the final exit, exit at the first h_i > tau.

Deliberate departures from the reference code (its bugs): frozen BatchNorm statistics do not drift
and dropout does not run while branches train; exits are mixed in probability space and clamped
before the log; accuracy is always ground truth, with agreement reported separately.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from exitbench.methods.base import (
    N_EXITS,
    PLACEMENT,
    PRECISION,
    ExitOutputs,
    ExitPoint,
    HParam,
    Method,
    MultiExitNet,
    StagedBackbone,
)
from exitbench.methods.heads import ConvBranch
from exitbench.methods.losses import cost_aware_loss


class PTEENet(Method):
    """Post-trained conv branches with learned confidence on a frozen backbone."""

    name = "pteenet"
    version = "1"
    score = "confidence"
    scores = ("confidence", "max_softmax", "neg_entropy")
    trains_backbone = False
    hparams = {
        "n_exits": N_EXITS,
        "placement": PLACEMENT,
        "branch_depth": HParam(2, "conv blocks in a branch (0 = pool head; conv2 is the paper's)",
                               (0, 1, 2, 3)),
        "loss": HParam("v2", "v1: loss on the mixture at exit 0; v2: mean over all exits", ("v1", "v2")),
        "lam": HParam(1.0, "lambda: weight of the expected-cost term"),
        "targets": HParam("labels", "labels (ground truth) or backbone (its argmax)", ("labels", "backbone")),
        "tau": HParam(0.5, "inference threshold on the confidence (exit when h > tau)"),
        "epochs": HParam(10, "training epochs"),
        "lr": HParam(1e-3, "Adam learning rate"),
        "batch_size": HParam(128, "training batch size"),
        "precision": PRECISION,
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
