"""SDN (IC-only): internal classifiers trained on a frozen pretrained network.

Paper: Kaya, Hong, Dumitras, "Shallow-Deep Networks: Understanding and Mitigating Network
Overthinking" (ICML 2019). Reference code: github.com/yigitcankaya/Shallow-Deep-Networks. Rule
implemented: the backbone is frozen and kept in eval mode; each internal classifier
(IC) is mixed max/avg pooling to a small map with a learned mixing weight alpha, then one Linear;
the ICs are trained with the sum of their cross-entropies (the final exit is the frozen backbone's
classifier and takes no loss); at inference a sample leaves at the first IC whose max-softmax
reaches q (one global q, swept).

Choices recorded here:
- ``regime: mixed | joint`` (see the README) trains the backbone with the ICs; the final exit then joins
  the loss (the paper's "SDN training" weights the ICs by a schedule, not copied here).
- Exits are placed by the shared cost rule (``placement``), not SDN's fixed 15/30/.../90 % of the
  FLOPs, so every method in a comparison uses the same exit points; ``placement: linear`` with
  ``n_exits: 6`` is close to SDN's own layout.
- Heads pool adaptively to ``pool_size`` x ``pool_size`` (4 in the reference; an integer >= 1, checked by
  the shared ``HParam`` check with ``COMMON_RANGES``, as for ZTW and JEI-DNN, which reuse this spec); see
  ``exitbench.methods.heads.MixedPool`` for how this differs from the reference's fixed kernel.
- Reference settings: Adam, lr 1e-3, 25 epochs with the lr divided by 10 after epoch 15, weight
  decay 1e-4 (ResNet, MobileNet) or 5e-4 (VGG, WideResNet), batch 128. The shared loop has no step
  schedule; defaults use 10 epochs for CPU runs (set ``epochs: 25`` for the reference budget).

Reference-code behaviour not copied: it calls ``model.train()`` during IC-only training, so the frozen
network's BatchNorm statistics drift and its dropout runs; its ResNet ICs read the block output
before the block's last ReLU (here every IC reads the features after the block); when no IC is
confident it returns the most confident exit's output rather than the final exit's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from exitbench.methods.base import (
    PLACEMENT,
    PRECISION,
    ExitOutputs,
    ExitPoint,
    HParam,
    Method,
    MultiExitNet,
    StagedBackbone,
)
from exitbench.methods.heads import SDNHead


class SDN(Method):
    """Mixed-pooling internal classifiers trained with per-exit cross-entropy on a frozen backbone."""

    name = "sdn"
    version = "1"
    score = "max_softmax"
    scores = ("max_softmax", "neg_entropy")
    trains_backbone = False
    hparams = {
        "n_exits": HParam(3, "number of early exits (internal classifiers)"),
        "placement": PLACEMENT,
        "pool_size": HParam(4, "side of the mixed-pooled map an IC classifies (reference: 4)"),
        "epochs": HParam(10, "training epochs (reference: 25)"),
        "lr": HParam(1e-3, "Adam learning rate (reference: 1e-3)"),
        "batch_size": HParam(128, "training batch size (reference: 128)"),
        "precision": PRECISION,
        "weight_decay": HParam(1e-4, "Adam weight decay (reference: 1e-4 for ResNets, 5e-4 for VGG)"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        heads = [SDNHead(e, num_classes, int(self.hp["pool_size"])) for e in exits]
        return MultiExitNet(backbone, exits, heads, freeze_backbone=True)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet | None = None) -> Tensor:
        # On the frozen backbone (SDN's IC-only training) the final exit takes no loss: nothing it could train.
        # When a regime trains the backbone (mixed, joint) the final exit is one more term, as in the paper's
        # joint "SDN training" (without its per-IC weight schedule) -- else the final classifier never learns.
        logits = outputs.logits if net is not None and not net.freeze_backbone else outputs.logits[:-1]
        return torch.stack([F.cross_entropy(lg.float(), target) for lg in logits]).sum()
