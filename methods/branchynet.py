"""BranchyNet: side branches trained jointly with the backbone, entropy exits.

Paper: Teerapittayanon, McDanel, Kung, "BranchyNet: Fast Inference via Early Exiting from Deep Neural
Networks" (ICPR 2016). Reference code: github.com/kunglab/branchynet (Chainer). Rule implemented:
joint training of backbone and branches on L = sum_n w_n CE(p_n, y) over every
exit, the final one included; at inference, leave at the first exit n with entropy(p_n) < T_n
(one threshold per exit, screened on the calibration split); the last exit always classifies.

Choices recorded here:
- Weights ``paper`` (default): w_n = 1.0 for every early exit and 0.3 for the final exit. The spec
  says the paper found "w = (1.0, ..., 0.3 for the last)" better than equal weights; "the last" is
  read as the last exit, i.e. the backbone's own classifier, which the reference code also lists
  last among its exits. The rationale is the paper's: weighting the early branches more makes the
  early layers more discriminative so that more samples leave early. ``equal``: every w_n = 1.
- Branches: PTEENet's conv branch without its confidence head ([Conv3x3-BN-ReLU] x ``branch_depth``
  -> global average pool -> Linear), so a comparison with PTEENet differs in training, not in head
  capacity. The paper's branches are a few conv layers + a linear classifier of its own design.
- Schedule: the paper trains the backbone first, then all exits jointly; here the harness supplies
  the trained (or pretrained) backbone and ``fit`` is the joint phase. Adam lr 1e-3 with betas
  (0.99, 0.999) as in the paper.
- The policy accepts score >= -T_n, i.e. entropy <= T_n; it differs from the paper's strict ``<``
  only on a set of measure zero.

Reference-code behaviour not copied: its ``Branch`` ignores the weight it is given (every w_n = 1),
its Adam uses betas (0.9, 0.999), and its thresholds are screened on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from exitbench.methods.base import (
    N_EXITS,
    PLACEMENT,
    PRECISION,
    Budget,
    ExitOutputs,
    ExitPoint,
    HParam,
    Method,
    MultiExitNet,
    StagedBackbone,
    UserError,
)
from exitbench.methods.heads import ConvBranch

PAPER_FINAL_WEIGHT = 0.3  # the final exit's weight; every early exit gets 1.0 (see the module docstring)


def exit_weights(n_exits: int, scheme: str) -> list[float]:
    """Loss weights w_0..w_N for ``n_exits`` exits in total (the final one included)."""
    if scheme == "equal":
        return [1.0] * n_exits
    return [1.0] * (n_exits - 1) + [PAPER_FINAL_WEIGHT]


class BranchyNet(Method):
    """Conv branches trained jointly with the backbone on a weighted sum of per-exit cross-entropies."""

    name = "branchynet"
    version = "1"
    score = "neg_entropy"
    scores = ("neg_entropy", "max_softmax")
    trains_backbone = True
    per_exit_thresholds = True  # one entropy threshold T_n per exit, screened on calibration
    hparams = {
        "n_exits": N_EXITS,
        "placement": PLACEMENT,
        "branch_depth": HParam(2, "conv blocks in a branch (0 = pool head; 2 matches PTEENet's conv2)", (0, 1, 2, 3)),
        "weights": HParam("paper", "paper: early exits 1.0, final exit 0.3; equal: all 1.0", ("paper", "equal")),
        "epochs": HParam(10, "joint training epochs"),
        "lr": HParam(1e-3, "Adam learning rate (paper: 1e-3)"),
        "betas": HParam((0.99, 0.999), "Adam betas (paper: 0.99, 0.999; the reference code uses 0.9, 0.999)"),
        "batch_size": HParam(128, "training batch size"),
        "precision": PRECISION,
        "weight_decay": HParam(0.0, "Adam weight decay (none in the paper)"),
    }

    def __init__(self, **hparams):
        super().__init__(**hparams)
        betas = self.hp["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)):
            raise UserError(f"method {self.name}: betas must be two numbers in [0, 1), got {betas!r}")

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        depth = int(self.hp["branch_depth"])
        heads = [ConvBranch(e, num_classes, depth=depth, confidence=False) for e in exits]
        return MultiExitNet(backbone, exits, heads, freeze_backbone=False)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet | None = None) -> Tensor:
        w = exit_weights(len(outputs.logits), self.hp["weights"])
        return torch.stack([wi * F.cross_entropy(lg.float(), target) for wi, lg in zip(w, outputs.logits)]).sum()

    def budget(self) -> Budget:
        b = super().budget()
        b.betas = tuple(float(x) for x in self.hp["betas"])  # a YAML list arrives as a list
        return b
