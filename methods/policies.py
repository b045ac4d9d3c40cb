"""Exit scores and the threshold policy.

An exit score is a per-sample number, higher = more confident. The threshold policy leaves at the
first exit whose score reaches (>=) its threshold; the final exit always accepts. A threshold of
``+inf`` means "never leave here". The same two functions serve the real dynamic forward
(``ThresholdPolicy.accept``) and the offline, vectorised evaluation on traces (``first_exit``), so
the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from methods.base import UserError, did_you_mean


def max_softmax(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Largest class probability."""
    return logits.float().softmax(-1).amax(-1)


def neg_entropy(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Minus the entropy of the softmax, in nats (BranchyNet exits when entropy < T, i.e. score > -T)."""
    logp = logits.float().log_softmax(-1)
    return (logp.exp() * logp).sum(-1)


def learned_confidence(logits: Tensor, confidence: Tensor | None = None) -> Tensor:
    """The head's own confidence in (0, 1) (EENet, PTEENet)."""
    if confidence is None:
        raise UserError("score: 'confidence' needs a method with confidence heads (eenet, pteenet); "
                        "use max_softmax or neg_entropy")
    return confidence.float()


SCORES: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "max_softmax": max_softmax,
    "neg_entropy": neg_entropy,
    "confidence": learned_confidence,
}


def get_score(name: str) -> Callable[[Tensor, Tensor | None], Tensor]:
    if name not in SCORES:
        raise UserError(f"score: unknown exit score {name!r}; {did_you_mean(name, list(SCORES))}")
    return SCORES[name]


@dataclass(frozen=True)
class ThresholdPolicy:
    """Leave at the first early exit k with ``score_k >= thresholds[k]``; else at the final exit."""

    score: str
    thresholds: tuple[float, ...]

    @classmethod
    def shared(cls, score: str, threshold: float, n_early: int) -> ThresholdPolicy:
        return cls(score, (float(threshold),) * n_early)

    def accept(self, k: int, logits: Tensor, confidence: Tensor | None) -> Tensor:
        return get_score(self.score)(logits, confidence) >= self.thresholds[k]


def first_exit(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Exit index per (threshold setting, sample), vectorised.

    ``scores``: [K, N] early-exit scores (K early exits, N samples).
    ``thresholds``: [G, K] (one row per setting) or [G] (one shared threshold per setting).
    Returns [G, N] long in 0..K, where K means the final exit. Costs O(G*N*K), no network pass.
    """
    k_early, n = scores.shape
    if thresholds.dim() == 1:
        thresholds = thresholds[:, None].expand(-1, k_early)
    passed = scores[None, :, :] >= thresholds[:, :, None].to(scores.dtype)  # [G, K, N]
    # first True along K; K when none: append an always-true final row and take argmax
    final = torch.ones((passed.shape[0], 1, n), dtype=torch.bool, device=scores.device)
    return torch.cat([passed, final], dim=1).to(torch.uint8).argmax(dim=1)


def score_matrix(score: str, logits: Sequence[Tensor], confidence: Sequence[Tensor] | None) -> Tensor:
    """[K, N] scores of the early exits (all exits but the last) under the named score."""
    fn = get_score(score)
    conf = list(confidence) if confidence is not None else [None] * len(logits)
    return torch.stack([fn(lg, c) for lg, c in zip(logits[:-1], conf[:-1])])
