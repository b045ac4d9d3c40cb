"""Exit scores and the threshold policy.

An exit score is a per-sample number, higher = more confident. The threshold policy leaves at the
first exit whose score reaches (>=) its threshold; the final exit always accepts. A threshold of
``+inf`` means "never leave here". The same two functions serve the real dynamic forward
(``ThresholdPolicy.accept``) and the offline, vectorised evaluation on traces (``first_exit``), so
the two cannot disagree. ``strict=True`` switches both to ``score > threshold``, the convention of
risk control (docs/risk_control.md: exit at the first l with c_l(x) > lambda, so lambda = 1 never exits).

Sequence scores depend on the exits before the current one, not on its output alone. The one we have
is ``patience`` (PABEE, Zhou et al., NeurIPS 2020, github JetRunner/PABEE): the number of consecutive
earlier exits whose prediction equals this exit's. On traces it is an ordinary [K, N] score matrix
(``score_matrix``/``first_exit`` work unchanged); in the real dynamic forward it needs per-sample
state across exits, which ``PatiencePolicy`` keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from exitbench.core.registry import Registry, first_line
from exitbench.methods.base import UserError


def max_softmax(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Largest class probability."""
    return logits.float().softmax(-1).amax(-1)


def neg_entropy(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Minus the entropy of the softmax, in nats (BranchyNet exits when entropy < T, i.e. score > -T)."""
    logp = logits.float().log_softmax(-1)
    return (logp.exp() * logp).sum(-1)


def learned_confidence(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """The head's own confidence in [0, 1] (EENet, PTEENet; JEI-DNN's gate)."""
    if confidence is None:
        raise UserError("score: 'confidence' needs a method with confidence heads (eenet, pteenet); "
                        "use max_softmax or neg_entropy")
    return confidence.float()


def patience_counters(logits: Sequence[Tensor] | Tensor) -> Tensor:
    """PABEE counters [E, N] for E exits: at exit k, how many consecutive exits before k predict what k
    predicts (0 when k's argmax differs from k-1's; 0 at exit 0).

    PABEE's loop (``patient_counter += 1`` if the argmax is unchanged, else 0; leave when it equals
    ``patience``) leaves at the first exit whose counter reaches the patience, which is
    ``first_exit(counters[:-1], patience)``. Vectorised: counter_k = k - (last exit <= k where the
    prediction changed).
    """
    preds = torch.stack([lg.argmax(-1) for lg in logits])  # [E, N]
    e = preds.shape[0]
    idx = torch.arange(e, device=preds.device)[:, None].expand_as(preds)
    changed = torch.ones_like(preds, dtype=torch.bool)
    changed[1:] = preds[1:] != preds[:-1]
    last_change = torch.where(changed, idx, torch.zeros_like(idx)).cummax(dim=0).values
    return (idx - last_change).float()


@dataclass(frozen=True)
class Score:
    """An exit score: ``fn(logits, confidence) -> [N]`` per exit, or, for a ``sequence`` score such as
    patience, ``fn(all exits' logits) -> [E, N]``."""

    name: str
    fn: Callable
    sequence: bool = False


SCORES: Registry[Score] = Registry("score", base=Score)
for _fn, _name in ((max_softmax, "max_softmax"), (neg_entropy, "neg_entropy"), (learned_confidence, "confidence")):
    SCORES.register(_name, Score(_name, _fn), help=first_line(_fn))
SCORES.register("patience", Score("patience", patience_counters, sequence=True),
                help="PABEE: consecutive earlier exits that agree with this one (a sequence score)")


def get_score(name: str) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The per-exit score function called ``name`` (sequence scores such as ``patience`` have none)."""
    score = SCORES.get(name)
    if score.sequence:
        raise UserError(f"score: {name!r} depends on earlier exits; use PatiencePolicy (or make_policy) "
                        "for the dynamic forward, score_matrix on traces")
    return score.fn


@dataclass(frozen=True)
class ThresholdPolicy:
    """Leave at the first early exit k with ``score_k >= thresholds[k]`` (``>`` when ``strict``);
    else at the final exit."""

    score: str
    thresholds: tuple[float, ...]
    strict: bool = False
    temperatures: tuple[float, ...] | None = None  # per early exit: logits / T_k before the score

    @classmethod
    def shared(cls, score: str, threshold: float, n_early: int, strict: bool = False) -> ThresholdPolicy:
        return cls(score, (float(threshold),) * n_early, strict)

    def accept(self, k: int, logits: Tensor, confidence: Tensor | None) -> Tensor:
        if self.temperatures is not None:
            logits = logits / self.temperatures[k]
        s = get_score(self.score)(logits, confidence)
        return s > self.thresholds[k] if self.strict else s >= self.thresholds[k]


class PatiencePolicy:
    """PABEE: leave at early exit k once ``patience_counters`` reaches ``thresholds[k]`` there.

    Stateful, for ``MultiExitNet.forward_dynamic``, which calls ``accept(k, ...)`` for k = 0, 1, ...
    and, after removing the rows that left, ``compact(index)`` with the positions of the rows that stayed
    (in the previous call's order). The policy keeps the previous exit's predictions and counters for
    exactly the rows it will see next, so no boolean indexing (a hidden device sync) is needed. A call
    with k = 0 starts a new batch; rows that do not match are an error, not a silent misalignment.
    """

    score = "patience"

    def __init__(self, thresholds: Sequence[float], strict: bool = False):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.strict = strict
        self._k = -1
        self._pred: Tensor | None = None
        self._counter: Tensor | None = None

    @classmethod
    def shared(cls, patience: float, n_early: int, strict: bool = False) -> PatiencePolicy:
        return cls((float(patience),) * n_early, strict)

    def accept(self, k: int, logits: Tensor, confidence: Tensor | None = None) -> Tensor:
        pred = logits.argmax(-1)
        if k == 0:
            counter = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
        else:
            if k != self._k + 1 or self._pred is None or self._counter is None:
                raise RuntimeError(f"PatiencePolicy: accept(k={k}) after k={self._k}; exits must come in order "
                                   "starting at 0")
            if self._pred.shape != pred.shape:
                raise RuntimeError(f"PatiencePolicy: exit {k} got {pred.shape[0]} rows, expected the "
                                   f"{self._pred.shape[0]} that did not leave at exit {k - 1}")
            counter = torch.where(pred == self._pred, self._counter + 1, torch.zeros_like(self._counter))
        t = self.thresholds[k]
        self._k, self._pred, self._counter = k, pred, counter
        return counter > t if self.strict else counter >= t

    def compact(self, index: Tensor) -> None:
        """Keep the state of the rows at ``index`` (those that did not leave), in that order."""
        if self._pred is not None and self._counter is not None:
            self._pred, self._counter = self._pred.index_select(0, index), self._counter.index_select(0, index)


def make_policy(score: str, thresholds: Sequence[float], strict: bool = False,
                temperatures: Sequence[float] | None = None) -> ThresholdPolicy | PatiencePolicy:
    """The dynamic-forward policy for ``score`` with per-early-exit ``thresholds`` (and, when the
    thresholds were chosen on temperature-scaled scores, the early exits' ``temperatures``; patience
    reads only argmaxes, which no temperature changes)."""
    if score == "patience":
        return PatiencePolicy(thresholds, strict)
    get_score(score)  # fail early, with a hint, on an unknown name
    temps = None if temperatures is None else tuple(float(t) for t in temperatures)
    return ThresholdPolicy(score, tuple(float(t) for t in thresholds), strict, temps)


def first_exit(scores: Tensor, thresholds: Tensor, strict: bool = False) -> Tensor:
    """Exit index per (threshold setting, sample), vectorised.

    ``scores``: [K, N] early-exit scores (K early exits, N samples).
    ``thresholds``: [G, K] (one row per setting) or [G] (one shared threshold per setting).
    ``strict``: leave when ``score > threshold`` instead of ``>=``.
    Returns [G, N] long in 0..K, where K means the final exit. Costs O(G*N*K), no network pass.
    Batched use: scores [..., K, N] with per-exit thresholds [..., G, K] (leading dims broadcast)
    give [..., G, N].
    """
    k_early, n = scores.shape[-2:]
    if thresholds.dim() == 1:
        thresholds = thresholds[:, None].expand(-1, k_early)
    # thresholds are rounded to the scores' dtype, as ThresholdPolicy.accept does with a Python float
    thr = thresholds.to(scores.dtype)
    lead = torch.broadcast_shapes(scores.shape[:-2], thr.shape[:-2])
    out = torch.full((*lead, thr.shape[-2], n), k_early, dtype=torch.long, device=scores.device)
    # from the last early exit to the first, so the first passing exit wins; K where-passes over
    # [G, N] are ~15x faster on CPU than an argmax over the exit dim of a [G, K+1, N] mask
    for k in range(k_early - 1, -1, -1):
        s, t = scores[..., k:k + 1, :], thr[..., :, k:k + 1]  # [..., 1, N], [..., G, 1]
        out = torch.where(s > t if strict else s >= t, k, out)
    return out


def score_matrix(score: str, logits: Sequence[Tensor], confidence: Sequence[Tensor] | None) -> Tensor:
    """[K, N] scores of the early exits (all exits but the last) under the named score."""
    if SCORES.get(score).sequence:
        return SCORES.get(score).fn(logits)[:-1]
    fn = get_score(score)
    conf = list(confidence) if confidence is not None else [None] * len(logits)
    return torch.stack([fn(lg, c) for lg, c in zip(logits[:-1], conf[:-1])])
