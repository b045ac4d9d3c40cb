"""An example exitbench method plugin: ``pool_exits``.

Rule: the pretrained backbone is frozen (and kept in eval mode by ``MultiExitNet``); each early exit
is a global average pool followed by one Linear layer; the exits are trained with the sum of their
cross-entropies; a sample leaves at the first exit whose max-softmax reaches the threshold.

It imports only ``exitbench.methods.base``, the plugin contract, so it works with any exitbench install.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from exitbench.methods.base import ExitOutputs, ExitPoint, HParam, Method, MultiExitNet, StagedBackbone


class PoolLinear(nn.Module):
    """Average the features at an exit point, then classify them with one Linear layer.

    CNN features are [B, C, H, W] (average over H, W); ViT features are tokens [B, T, C] (average
    over the tokens).
    """

    def __init__(self, exit_point: ExitPoint, num_classes: int):
        super().__init__()
        self.token_features = len(exit_point.feature_shape) == 2
        self.classifier = nn.Linear(exit_point.channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = x.mean(dim=1) if self.token_features else x.mean(dim=(2, 3))
        return self.classifier(z)


class PoolExits(Method):
    """Pooled linear exits trained with per-exit cross-entropy on a frozen backbone."""

    name = "pool_exits"
    version = "1"  # bump when a change would change results
    score = "max_softmax"  # the harness sweeps thresholds on this score
    scores = ("max_softmax", "neg_entropy")
    trains_backbone = False
    hparams = {
        # n_exits and placement are read by Method.place_exits (the shared cost-based rule).
        "n_exits": HParam(3, "number of early exits"),
        "placement": HParam("linear", "fine | pareto | linear | gold_ratio | list of block names or cost fractions"),
        # Names of Budget fields: Method.budget() passes them to the shared training loop.
        "epochs": HParam(5, "training epochs"),
        "lr": HParam(1e-3, "Adam learning rate"),
        "batch_size": HParam(128, "training batch size"),
        "weight_decay": HParam(0.0, "Adam weight decay"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        heads = [PoolLinear(e, num_classes) for e in exits]
        return MultiExitNet(backbone, exits, heads, freeze_backbone=True)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet) -> Tensor:
        # The last logits are the frozen backbone's own classifier: nothing to train there.
        return torch.stack([F.cross_entropy(lg, target) for lg in outputs.logits[:-1]]).sum()
