"""Per-exit temperature scaling of exit scores, and the expected calibration error (ECE).

Temperature scaling (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017)
divides an exit's logits by one scalar T > 0 fitted to minimise the negative log-likelihood on held-out
data. The argmax, so every prediction and accuracy, is unchanged. What changes is the confidence:
max-softmax and entropy scores, and so which samples a threshold sends out early. Each exit gets its
own T because early exits are typically over- or under-confident in their own way. The harness fits
the temperatures on a seeded sub-split of calibration, never on test. It reports the ECE on the rest of
calibration (data the fit never saw) and on test, before and after (docs/measurement.md, "Temperature
scaling").

ECE: the samples are binned by confidence (max-softmax) into ``bins`` equal-width bins. ECE is the
sample-weighted mean over bins of |accuracy - mean confidence|, in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

T_MIN, T_MAX = 0.05, 20.0  # the search interval of T (log-space): wide, and finite whatever the logits


def fit_temperature(logits: Tensor, labels: Tensor, iters: int = 60) -> float:
    """The T in [T_MIN, T_MAX] minimising the mean NLL of softmax(logits / T) (``logits`` [N, C]).

    The NLL is convex in 1/T, so it is unimodal in log T and a golden-section search on log T finds the
    optimum without step sizes or restarts. This is deterministic, unlike LBFGS from an arbitrary start.
    When every fit sample is classified correctly the NLL keeps falling as T -> 0, and the fit stops at
    ``T_MIN``: the exit is then as confident as the interval allows (reported, not hidden).
    """
    z, y = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(z / float(torch.tensor(log_t).exp()), y).item()

    lo, hi = float(torch.tensor(T_MIN).log()), float(torch.tensor(T_MAX).log())
    ratio = (5 ** 0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(torch.tensor((lo + hi) / 2).exp())


def fit_temperatures(logits: Tensor, labels: Tensor) -> list[float]:
    """One temperature per exit for ``logits`` [E, N, C]."""
    return [fit_temperature(lg, labels) for lg in logits]


def scale(logits: Tensor, temperatures: Tensor | list[float]) -> Tensor:
    """``logits`` [E, N, C] with exit e divided by ``temperatures[e]``."""
    t = torch.as_tensor(temperatures, dtype=logits.dtype, device=logits.device)
    return logits / t[:, None, None]


def ece(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error of the max-softmax confidence of ``logits`` [N, C] (module docstring)."""
    probs = logits.double().softmax(-1)
    conf, pred = probs.max(-1)
    right = (pred == labels).double()
    idx = (conf * bins).long().clamp(max=bins - 1)  # bin b holds (b/bins, (b+1)/bins]; conf = 1 in the last
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, right - conf)
    return float(gap.abs().sum() / max(len(labels), 1))


__all__ = ["T_MAX", "T_MIN", "ece", "fit_temperature", "fit_temperatures", "scale"]
