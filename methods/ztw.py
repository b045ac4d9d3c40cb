"""ZTW: cascading internal classifiers and geometric ensembles on a frozen pretrained network.

Paper: Wójcik, Przewięźlikowski, Szatkowski, Wołczyk, Bałazy, Krzepkowski, Podolak, Tabor, Śmieja,
Trzciński, "Zero Time Waste in Pre-trained Early Exit Neural Networks" (Neural Networks 167, 2023;
first as Wołczyk et al., NeurIPS 2021). Reference code: github.com/gmum/Zero-Time-Waste,
``ztw_cv/architectures/early_exits/ztw.py`` and ``heads.py``. Rule implemented:

- *Cascading connections*: internal classifier (IC) k > 0 also reads IC k-1's logits -- detached (no
  gradient flows back into the earlier IC) and layer-normalised -- concatenated with its pooled features
  before its Linear (the reference's ``pooled_cascading_head``: SDN's mixed pooling, then one Linear).
- *Geometric ensembling*: exit k outputs ``mean_i(exp(w_ki) * log_softmax(z_i)) + b_k`` over ICs 0..k, with
  its own weights ``w_k`` (init N(0, 0.01)) and class bias ``b_k`` (init 0): a weighted geometric mean
  of the ICs' probabilities, unnormalised. The backbone's own classifier is not ensembled (as in the
  reference: "ZTW does not build an ensemble on the original head").
- *Two phases on a frozen backbone* (kept in eval mode): first the cascading ICs with the mean
  cross-entropy over the exits, the ensembles off; then the ICs are frozen too and only the ensembles'
  weights and biases train, on the same objective over the ensembled outputs. At inference a sample leaves
  at the first exit whose (ensembled) max-softmax reaches the threshold.

Choices recorded here:
- Reference settings: phase 1 Adam lr 5e-3, weight decay 1e-4 (its ViT and ConvNeXt scripts); phase 2
  Adam lr 1e-3, no weight decay, 2 epochs, batch 64. Phase 2 here runs on the cell's training loader, so
  at the cell's batch size (128 by default), not 64; ``ensemble_epochs`` and ``ensemble_lr`` set the rest.
- ICs read a [B, C, H, W] map (``heads.to_map``; ViT tokens are laid out on their grid), the reference's
  ViT heads read the class token; one head design serves every backbone here, as for SDN.
- ``MixedPool`` passes maps of side <= ``pool_size`` through (the reference pools them up to 4 x 4).
- Exits are placed by the shared cost rule (``placement``), like every method here, rather than after
  every block as in the reference.
- Cost: exit k needs every IC before it (cascading, ensemble), which is exactly the ``strict``
  accounting; the ``paper`` column (prefix + one head) understates ZTW and is reported only beside it.
  The ensemble's few multiply-adds (k x classes) are elementwise and, like BatchNorm and activations
  elsewhere, not counted by the MACs counter; the cascading Linear's extra inputs are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from exitbench.methods.base import (
    Budget,
    Carry,
    ExitOutputs,
    ExitPoint,
    HParam,
    Method,
    MultiExitNet,
    StagedBackbone,
    merge_phases,
)
from exitbench.methods.heads import SDNHead
from exitbench.methods.sdn import SDN


class CascadingHead(SDNHead):
    """SDN's IC (mixed pooling, flatten, Linear) that, when ``cascading``, also reads the previous IC's
    logits: detached, layer-normalised, concatenated with the pooled features before the Linear."""

    def __init__(self, exit_point: ExitPoint, num_classes: int, pool_size: int = 4, cascading: bool = True):
        super().__init__(exit_point, num_classes, pool_size)
        self.cascading = cascading
        self.norm = nn.LayerNorm(num_classes) if cascading else None
        if cascading:  # SDN's Linear, widened by the previous IC's logits
            self.classifier = nn.Linear(self.classifier.in_features + num_classes, num_classes)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> Tensor:
        z = self.pool(self.adapt(x)).flatten(1)
        if self.norm is not None:
            if previous is None:
                raise ValueError("a cascading head needs the previous head's logits")
            z = torch.cat([z, self.norm(previous.detach())], dim=-1)
        return self.classifier(z)


class GeometricEnsemble(nn.Module):
    """``mean_i(exp(w_i) * logp_i) + b`` over the stacked log-probabilities [B, heads, classes]."""

    def __init__(self, num_heads: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_heads, 1) * 0.01)
        self.bias = nn.Parameter(torch.zeros(1, num_classes))

    def forward(self, logp: Tensor) -> Tensor:
        return (logp * self.weight.exp()).mean(dim=1) + self.bias


class ZTWNet(MultiExitNet):
    """A multi-exit net whose early exits cascade and ensemble (see the module docstring).

    The carry from exit k to k+1 is (IC k's raw logits, the stacked log-probabilities of ICs 0..k); the
    dynamic forward compacts it with the features. ``ensembling`` off gives the raw IC logits (phase 1).
    """

    def __init__(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], heads: Sequence[CascadingHead],
                 num_classes: int):
        super().__init__(backbone, exits, heads, freeze_backbone=True)
        self.ensembles = nn.ModuleList(GeometricEnsemble(k + 1, num_classes) for k in range(len(exits)))
        self.ensembling = True

    def run_head(self, k: int, feats: Tensor, carry: Carry = ()) -> tuple[Tensor, Carry]:
        if k == len(self.ensembles):  # the backbone's own classifier: neither cascaded nor ensembled
            return self.heads[k](feats), ()
        previous, stacked = carry if carry else (None, None)
        logits = self.heads[k](feats, previous)
        logp = F.log_softmax(logits, dim=-1)[:, None]
        stacked = logp if stacked is None else torch.cat([stacked, logp], dim=1)
        out = self.ensembles[k](stacked) if self.ensembling else logits
        return out, (logits, stacked)


class ZTW(Method):
    """Cascading ICs, then learned geometric ensembles, trained in two phases on a frozen backbone."""

    name = "ztw"
    version = "1"
    score = "max_softmax"
    scores = ("max_softmax", "neg_entropy")
    trains_backbone = False
    regimes = ("disjoint",)  # both phases are defined on a frozen pre-trained backbone
    # the ICs are SDN's: its exit, pooling and loop hyper-parameters, declared once there
    hparams = {k: SDN.hparams[k] for k in ("n_exits", "placement", "pool_size", "precision")} | {
        "epochs": HParam(10, "phase 1 (cascading ICs) epochs"),
        "lr": HParam(5e-3, "phase 1 Adam learning rate (reference: 5e-3)"),
        "weight_decay": HParam(1e-4, "phase 1 Adam weight decay (reference: 1e-4)"),
        "ensemble_epochs": HParam(2, "phase 2 (ensemble weights) epochs (reference: 2)", low=1),
        "ensemble_lr": HParam(1e-3, "phase 2 Adam learning rate (reference: 1e-3)", positive=True),
        "batch_size": HParam(128, "training batch size of both phases (reference: 128, then 64)"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> ZTWNet:
        heads = [CascadingHead(e, num_classes, int(self.hp["pool_size"]), cascading=k > 0) for k, e in enumerate(exits)]
        return ZTWNet(backbone, exits, heads, num_classes)

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet | None = None) -> Tensor:
        # The reference's objective in both phases: the mean cross-entropy over every exit's output (the
        # frozen final exit adds a constant).
        return torch.stack([F.cross_entropy(lg.float(), target) for lg in outputs.logits]).mean()

    def ensemble_budget(self, budget: Budget) -> Budget:
        """Phase 2's budget: the ensemble epochs and learning rate, no weight decay, the rest as phase 1."""
        return replace(budget, epochs=int(self.hp["ensemble_epochs"]), lr=float(self.hp["ensemble_lr"]),
                       weight_decay=0.0)

    def fit(self, net: ZTWNet, loaders: dict, budget: Budget, trainer) -> dict:
        heads = [p for h in net.heads[:-1] for p in h.parameters()]
        net.ensembling = False
        cascading = trainer(net, self.loss, heads, loaders, budget)
        net.ensembling = True
        for p in heads:  # phase 2 trains the ensembles alone
            p.requires_grad_(False)
        try:
            ensembling = trainer(net, self.loss, list(net.ensembles.parameters()), loaders,
                                 self.ensemble_budget(budget))
        finally:
            for p in heads:
                p.requires_grad_(True)
        return merge_phases({"cascading": cascading, "ensembling": ensembling})
