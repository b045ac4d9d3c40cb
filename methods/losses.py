"""Training losses shared by methods (the cost-aware loss of EENet, reused by PTEENet)."""

from __future__ import annotations

import torch
from torch import Tensor

from exitbench.methods.base import ExitOutputs

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
