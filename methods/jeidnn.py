"""JEI-DNN: learned exit gates trained jointly (bi-level) with the inference modules on a frozen backbone.

Paper: Regol, Chataoui, Coates, "Jointly-Learned Exit and Inference for a Dynamic Neural Network"
(ICLR 2024, arXiv 2310.09163). Reference code: github.com/networkslab/dynn (``src/train_dynn.py``,
``our_train_helper.py``, ``models/classifier_training_helper.py``, ``models/gate_training_helper.py``,
``models/custom_modules/learnable_uncertainty_gate.py``). Rule implemented:

- *Inference modules* (IMs) are the exit heads; a *gating module* (GM) after every early IM reads four
  uncertainty metrics of the IM's softmax -- max probability, entropy, margin (top-1 minus top-2) and the
  entropy of the squared, renormalised probabilities -- computed without gradient, through one Linear(4, 1):
  ``g_k = sigmoid(gate_k(u(z_k)))``.
- *Exit probabilities, direct parameterisation*: ``P_k = max(0, min(g_k, 1 - sum_{j<k} g_j))`` is the
  probability of leaving at exit k; the gate's output is the conditional one,
  ``a_k = clip(P_k / prod_{j<k} (1 - a_j), 0, 1)``. These need the earlier gates, so their sum travels from
  exit to exit in the carry (the product is a function of it, see ``exit_probabilities``). The exit rule is
  the paper's: leave at the first exit with ``a_k`` above 0.5 (``default_thresholds``), not a threshold on
  the max-softmax. ``a_k`` is each exit's ``confidence`` in the traces, so the harness also sweeps and
  calibrates thresholds on it like any score.
- *Training*, on the frozen backbone: a warm-up of the IMs alone on ``sum_k (K+1-k) CE_k`` (earlier IMs
  weighted more, the reference's warm-up loss), then bi-level alternation between two phases, switching at
  every ``bilevel_batches``-th batch of an epoch (the phase flips at each epoch's first batch too, as in the
  reference loop), starting with the gates:
  - *gate phase* (IMs fixed): each sample's target exit is ``t = argmin_k CE_k + lam * c_k`` over every exit
    including the final one (``c_k``: exit k's cost relative to the backbone, 1 for the final exit); gate k's
    target is 1 when ``k >= t`` ("exit at t and after"), trained with binary cross-entropy whose positives at
    gate k are weighted by ``min(#0_k / max(#1_k, 0.1), 5)``, the ratio of negative to positive targets there;
  - *IM phase* (gates fixed): the reference's exit-probability-weighted IM loss. Its per-sample rescaling
    (by ``sum_k CE_k / sum_k P_k CE_k``, with the gradient flowing through it) makes it equal, in value and
    gradient, to the mean cross-entropy over the early IMs, which is what is computed here
    (``tests/test_jeidnn.py`` checks the identity).
- ``lam`` (the reference's ``ce_ic_tradeoff``) is the trade-off: larger exits earlier. Sweep it with a
  matrix ``grid``; every trained net is still calibrated on its gate outputs.

Choices recorded here:
- Reference settings: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, 10 epochs in all (warm-up
  up to 3 on CIFAR-10 with T2T-ViT-7, so 7 bilevel epochs), ``bilevel_batches`` 200, ``lam`` 0.7 (the
  training script's default). The shared loop's SGD is Nesterov and has no schedule (the reference anneals
  the lr with a cosine to 2e-4).
- The warm-up runs ``warmup_epochs`` epochs; the reference stops each IM early on a validation split carved
  out of training. Methods here are handed no validation split (calibration is never trained on).
- The positive weights are counted on each batch; the reference counts them on its validation split after
  every epoch (1 before the first). Its count of positives at gate k is the samples whose target is k, which
  is the number of positives only at gate 0; here it is the positives themselves (``#1_k``, targets <= k), the
  "#0/#1" its comment names. Where a gate has no negative target the weight is 1, not the reference's 0
  (which would stop a gate from learning exactly when every sample should leave there).
- IMs are SDN's mixed-pooling ICs on the map ``heads.to_map`` builds (the reference's T2T-ViT IMs read the
  class token), at the shared placement rather than after every transformer block.
- ``a_k`` is computed from the sum of the earlier g alone (equal in exact arithmetic to the reference's
  ratio of two running quantities, which rounds a hair below 1 where it should be 1, and is 0/0 after a gate
  that took everything; here that is 1).
- Cost: the gate's Linear(4, 1) is counted; its softmax metrics (about 9 x classes elementwise operations) are
  not, like every elementwise operation here. The harness's ``method_default`` point uses ``a_k > 0.5``, the
  reference ``a_k >= 0.5``; they differ only where a gate outputs exactly 0.5.
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

POS_WEIGHT_CAP = 5.0  # the reference clips the positive weight "for stability"


def uncertainty_features(logits: Tensor) -> Tensor:
    """[B, 4]: max probability, entropy (nats), margin (top-1 minus top-2) and the entropy of the squared,
    renormalised probabilities, of ``softmax(logits)``; no gradient flows back into the logits."""
    p = logits.detach().float().softmax(-1)
    top2 = p.topk(2, dim=-1).values
    logp = p.clamp_min(1e-12).log()
    entropy = -(p * logp).sum(-1)
    sq = p.square()
    sq = sq / sq.sum(-1, keepdim=True)
    entropy_sq = -(sq * sq.clamp_min(1e-12).log()).sum(-1)
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1], entropy_sq], dim=-1)


class UncertaintyGate(nn.Module):
    """The gating module: one Linear on the IM's four uncertainty metrics; returns the gate's logit [B]."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, logits: Tensor) -> Tensor:
        return self.linear(uncertainty_features(logits).to(self.linear.weight.dtype)).squeeze(-1)


def exit_probabilities(g: Tensor, spent: Tensor) -> tuple[Tensor, Tensor]:
    """(P_k, a_k) from the gate ``g`` [B] and ``spent`` = the sum of the earlier gates' g (module docstring).

    The reference carries ``prod_{j<k} (1 - a_j)`` too, but that product is ``1 - min(spent, 1)`` exactly (the
    P_j sum to ``min(spent, 1)``), so ``a_k = min(g_k / (1 - spent), 1)``, and 1 once nothing is left.
    Computing it from the one carried sum keeps ``a_k`` exactly 1 wherever ``P_k`` takes all that is left:
    two routes to the same number would round apart (differently in eager and compiled code), and a
    threshold of 1 would then split samples that are mathematically alike."""
    left = 1 - spent
    p = torch.minimum(g, left).clamp_min(0)
    return p, torch.where(g >= left, torch.ones_like(g), g / left.clamp_min(1e-12))


class JEIDNNNet(MultiExitNet):
    """IMs with a gate after each early one; exit k outputs ``(logits, a_k)`` and carries
    ``(sum_{j<=k} g_j,)`` to exit k+1."""

    def __init__(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], heads: Sequence[nn.Module]):
        super().__init__(backbone, exits, heads, freeze_backbone=True)
        self.gates = nn.ModuleList(UncertaintyGate() for _ in exits)

    def run_head(self, k: int, feats: Tensor, carry: Carry = ()) -> tuple[Tensor | tuple[Tensor, Tensor], Carry]:
        logits = self.heads[k](feats)
        if k == len(self.gates):  # the backbone's own classifier: no gate, everything left leaves here
            return logits, ()
        g = torch.sigmoid(self.gates[k](logits))
        (spent,) = carry if carry else (torch.zeros_like(g),)
        _, a = exit_probabilities(g, spent)
        return (logits, a), (spent + g,)


def gate_targets(ce: Tensor, costs: Tensor, lam: float) -> Tensor:
    """Each sample's target exit, ``argmin_k ce[:, k] + lam * costs[k]`` over all K+1 exits ([B, K+1] -> [B])."""
    return (ce + lam * costs[None, :]).argmin(dim=1)


def gate_loss(gate_logits: Tensor, target: Tensor) -> Tensor:
    """Balanced BCE of the K gates [B, K] against "exit at the target exit and after" (module docstring)."""
    b, k = gate_logits.shape
    z = F.one_hot(target, k + 1)[:, :k].float().cumsum(dim=1)  # 1 at gates >= target; 0s for the final exit
    ones = z.sum(0)
    zeros = b - ones
    # positives weighted #0/#1 per gate, capped; with no negatives at a gate there is nothing to balance: 1
    pos_weight = torch.where(zeros > 0, (zeros / ones.clamp_min(0.1)).clamp(max=POS_WEIGHT_CAP), torch.ones_like(ones))
    weight = z * pos_weight[None, :] + (1 - z)
    return (F.binary_cross_entropy_with_logits(gate_logits.float(), z, reduction="none") * weight).mean()


class BilevelLoss:
    """The bi-level objective as one loss for the shared loop: it counts the batches it is called on and
    returns the gate loss or the IM loss by phase, so one optimiser over IMs and gates updates only the side
    whose loss it is (the other gets no gradient, and the optimiser skips parameters without one)."""

    def __init__(self, method: JEIDNN, batches_per_epoch: int, every: int):
        self.method, self.batches_per_epoch, self.every = method, max(batches_per_epoch, 1), every
        self.calls, self.phase = 0, "ims"  # the reference enters the loop in the IM phase and flips at batch 0
        self.batches = {"gates": 0, "ims": 0}

    def __call__(self, outputs: ExitOutputs, target: Tensor, net: JEIDNNNet) -> Tensor:
        if (self.calls % self.batches_per_epoch) % self.every == 0:
            self.phase = "gates" if self.phase == "ims" else "ims"
        self.calls += 1
        self.batches[self.phase] += 1
        if self.phase == "ims":
            return self.method.loss(outputs, target, net)
        return self.method.gate_phase_loss(outputs, target, net)

    def state_dict(self) -> dict:
        """The phase bookkeeping, saved with the harness's epoch checkpoints (a resumed run flips alike)."""
        return {"calls": self.calls, "phase": self.phase, "batches": dict(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.phase, self.batches = int(state["calls"]), str(state["phase"]), dict(state["batches"])


class JEIDNN(Method):
    """Uncertainty-metric gates and IMs trained bi-level on a frozen backbone; exit where the gate says so."""

    name = "jeidnn"
    version = "1"
    score = "confidence"  # the gate's conditional exit probability a_k
    scores = ("confidence", "max_softmax", "neg_entropy")
    trains_backbone = False
    regimes = ("disjoint",)  # the paper and reference train gates and IMs on a frozen pre-trained backbone
    # the IMs are SDN's ICs: its exit, pooling and precision hyper-parameters, declared once there
    hparams = {k: SDN.hparams[k] for k in ("n_exits", "placement", "pool_size", "precision")} | {
        "lam": HParam(0.7, "cost trade-off of the gate targets: argmin CE_k + lam * cost_k (reference default 0.7)"),
        "warmup_epochs": HParam(3, "IM warm-up epochs before the bi-level phases (reference: up to 3-6)", low=1),
        "epochs": HParam(7, "bi-level epochs after the warm-up (reference: 10 in all)"),
        "bilevel_batches": HParam(200, "batches per phase before gates and IMs swap (reference: 200)", low=1),
        "optimizer": HParam("sgd", "optimiser of both stages (reference: SGD, momentum 0.9)", ("sgd", "adam", "adamw")),
        "lr": HParam(0.01, "learning rate (reference: 0.01)"),
        "weight_decay": HParam(5e-4, "weight decay (reference: 5e-4)"),
        "batch_size": HParam(64, "training batch size (reference: 64)"),
    }

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> JEIDNNNet:
        return JEIDNNNet(backbone, exits, [SDNHead(e, num_classes, int(self.hp["pool_size"])) for e in exits])

    def default_thresholds(self) -> float:
        return 0.5  # the paper's rule: leave when the gate's exit probability passes one half

    def warmup_loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet | None = None) -> Tensor:
        """``sum_k (K+1-k) CE_k`` over the K early IMs (the frozen final exit would add a constant)."""
        early = outputs.logits[:-1]
        n = len(early) + 1
        return sum((n - k) * F.cross_entropy(lg.float(), target) for k, lg in enumerate(early))

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet | None = None) -> Tensor:
        """The IM phase's loss (the gate phase's is :meth:`gate_phase_loss`)."""
        return torch.stack([F.cross_entropy(lg.float(), target) for lg in outputs.logits[:-1]]).mean()

    def gate_phase_loss(self, outputs: ExitOutputs, target: Tensor, net: JEIDNNNet) -> Tensor:
        """The gate phase: targets from the current IMs and costs, balanced BCE on the gates' logits."""
        with torch.no_grad():
            ce = torch.stack([F.cross_entropy(lg.float(), target, reduction="none") for lg in outputs.logits], 1)
            t = gate_targets(ce, net.rel_costs.to(ce), float(self.hp["lam"]))
        logits = torch.stack([gate(lg) for gate, lg in zip(net.gates, outputs.logits[:-1])], 1)
        return gate_loss(logits, t)

    def warmup_budget(self, budget: Budget) -> Budget:
        return replace(budget, epochs=int(self.hp["warmup_epochs"]))

    def fit(self, net: JEIDNNNet, loaders: dict, budget: Budget, trainer) -> dict:
        ims = [p for h in net.heads[:-1] for p in h.parameters()]
        warmup = trainer(net, self.warmup_loss, ims, loaders, self.warmup_budget(budget))
        bilevel_loss = BilevelLoss(self, len(loaders["train"]), int(self.hp["bilevel_batches"]))
        bilevel = trainer(net, bilevel_loss, ims + list(net.gates.parameters()), loaders, budget)
        stats = merge_phases({"warmup": warmup, "bilevel": bilevel})
        stats["bilevel_batches"] = dict(bilevel_loss.batches)
        return stats
