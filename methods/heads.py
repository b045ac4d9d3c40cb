"""Exit-head building blocks shared by methods.

Heads take the features at an exit point: a map [B, C, H, W] for CNNs, or tokens [B, T, C] for ViTs,
which are turned into a map (prefix tokens dropped, patch tokens laid out on their square grid) so
that the same conv branch serves both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from methods.base import ExitPoint


class TokensToMap(nn.Module):
    """[B, T, C] ViT tokens -> [B, C, h, w] patch map (drops the first ``prefix_tokens``)."""

    def __init__(self, prefix_tokens: int):
        super().__init__()
        self.prefix_tokens = prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, self.prefix_tokens:]
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"cannot lay {x.shape[1]} patch tokens on a square grid")
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def to_map(exit_point: ExitPoint) -> nn.Module:
    """The adapter from an exit point's features to a [B, C, H, W] map (identity for CNNs)."""
    return TokensToMap(exit_point.prefix_tokens) if len(exit_point.feature_shape) == 2 else nn.Identity()


def conv_blocks(channels: int, depth: int) -> nn.Sequential:
    """``depth`` x [Conv3x3(C->C, pad 1, no bias) -> BN -> ReLU]."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ConvBranch(nn.Module):
    """PTEENet's branch: conv blocks -> global average pool -> classifier (+ sigmoid confidence).

    ``depth=0`` is the "pool" head. Returns logits, or ``(logits, confidence)`` when
    ``confidence=True``.
    """

    def __init__(self, exit_point: ExitPoint, num_classes: int, depth: int = 2, confidence: bool = True):
        super().__init__()
        c = exit_point.channels
        self.adapt = to_map(exit_point)
        self.body = conv_blocks(c, depth)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        self.confidence = nn.Linear(c, 1) if confidence else None

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        z = self.pool(self.body(self.adapt(x)))
        logits = self.classifier(z)
        if self.confidence is None:
            return logits
        return logits, torch.sigmoid(self.confidence(z)).squeeze(-1)
