"""EENet: early exits with learned confidence, trained jointly with a cost-aware loss.

Paper: Demir & Akbas, "Early-Exit Convolutional Neural Networks" (EENets; arXiv 2409.05336).
Reference code: github.com/eksuas/eenets.pytorch. Rule implemented: exits placed by
cost (the ``fine`` distribution is EENet's own), heads with a classifier and a sigmoid confidence,
backbone and heads trained jointly on the cost-aware loss built backwards from the final exit
(Y_i = h_i p_i + (1 - h_i) Y_{i+1}, C_i = h_i c_i + (1 - h_i) C_{i+1}); loss v2 (default) sums
NLL(log Y_i) + lambda * mean(C_i) over every exit with no 1/N factor, v1 keeps only the i = 0 term.
Inference: the first early exit with h_i > tau (tau = 0.5 in the reference; swept here too).

Choices recorded here:
- Joint training starts from the backbone the harness supplies (trained here, pretrained or a file),
  so EENet is compared with the other methods on the same backbone; the matrix entry
  ``regime: joint`` gives the paper's regime (a freshly initialised backbone), ``regime: disjoint``
  trains the heads alone on the frozen backbone.
- Reference settings: Adam, lr 1e-3, weight decay 1e-4, batch 32, 150 epochs. The defaults keep all
  of them but the epochs (10, for CPU runs); set ``epochs: 150`` for the reference budget.

Reference-code bugs not copied: its "bnpool" head's BatchNorm is not registered (it never trains and
its statistics are not saved) -- here it is a submodule; the log is taken of unclamped
probabilities -- here mixtures are clamped before the log; its inference reads ``conf.item()`` and so
works only at batch size 1 -- here the harness's policy exits per sample in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

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
from exitbench.methods.heads import BNPoolBranch, ConvBranch
from exitbench.methods.losses import cost_aware_loss


def eenet_head(kind: str, exit_point: ExitPoint, num_classes: int) -> nn.Module:
    """An exit head with a confidence output: ``pool``, ``bnpool`` or ``conv2`` (PTEENet's branch)."""
    if kind == "bnpool":
        return BNPoolBranch(exit_point, num_classes)
    return ConvBranch(exit_point, num_classes, depth=2 if kind == "conv2" else 0)


class EENet(Method):
    """Joint training of backbone and confidence heads on EENet's cost-aware loss."""

    name = "eenet"
    version = "1"
    score = "confidence"
    scores = ("confidence", "max_softmax", "neg_entropy")
    trains_backbone = True
    hparams = {
        "n_exits": N_EXITS,
        "placement": PLACEMENT,
        "head": HParam("pool", "pool: avg pool + linear heads (paper); bnpool: BN+ReLU first; conv2: PTEENet's",
                       ("pool", "bnpool", "conv2")),
        "loss": HParam("v2", "v2: sum over all exits (the original form); v1: the mixture at exit 0 only",
                       ("v1", "v2")),
        "lam": HParam(1.0, "lambda: weight of the expected-cost term"),
        "tau": HParam(0.5, "inference threshold on the confidence (exit when h > tau)"),
        "epochs": HParam(10, "joint training epochs (reference: 150)"),
        "lr": HParam(1e-3, "Adam learning rate (reference: 1e-3)"),
        "batch_size": HParam(32, "training batch size (reference: 32)"),
        "precision": PRECISION,
        "weight_decay": HParam(1e-4, "Adam weight decay (reference: 1e-4)"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        heads = [eenet_head(self.hp["head"], e, num_classes) for e in exits]
        return MultiExitNet(backbone, exits, heads, freeze_backbone=False)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet) -> Tensor:
        return cost_aware_loss(outputs, target, net.rel_costs, float(self.hp["lam"]), self.hp["loss"],
                               normalise_v2=False)

    def default_thresholds(self) -> float:
        return float(self.hp["tau"])
