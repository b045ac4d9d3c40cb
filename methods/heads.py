"""Exit-head building blocks shared by methods.

Heads take the features at an exit point: a map [B, C, H, W] for CNNs, a channels-last map [B, H, W, C]
(Swin, MambaOut) or tokens [B, T, C] for ViTs, which are turned into a [B, C, H, W] map (prefix tokens
dropped, patch tokens laid out on their square grid) so that the same conv branch serves all.

Heads: ``ConvBranch`` (PTEENet's conv2 branch; depth 0 = EENet's "pool" head; BranchyNet's branch
without the confidence output), ``BNPoolBranch`` (EENet's "bnpool") and ``SDNHead`` (SDN's
internal classifier with ``MixedPool``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from exitbench.methods.base import ExitPoint


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


class ChannelsLastToMap(nn.Module):
    """[B, H, W, C] (Swin, MambaOut) -> [B, C, H, W]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def to_map(exit_point: ExitPoint) -> nn.Module:
    """The adapter from an exit point's features to a [B, C, H, W] map (identity for CNNs)."""
    if len(exit_point.feature_shape) == 2:
        return TokensToMap(exit_point.prefix_tokens)
    return ChannelsLastToMap() if exit_point.channels_last else nn.Identity()


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


class BNPoolBranch(ConvBranch):
    """A "bnpool" head: BN -> ReLU -> global average pool -> classifier (+ sigmoid confidence).

    The ReLU follows PTEENet's branch code; the EENets reference bnpool has none (BN -> pool). The
    BatchNorm is a registered submodule, so it trains, its running statistics are saved and it
    follows ``train()``/``eval()`` (the EENet reference creates it outside the module tree).
    """

    def __init__(self, exit_point: ExitPoint, num_classes: int, confidence: bool = True):
        super().__init__(exit_point, num_classes, depth=0, confidence=confidence)
        self.body = nn.Sequential(nn.BatchNorm2d(exit_point.channels), nn.ReLU(inplace=True))


def map_side(exit_point: ExitPoint) -> int:
    """Side of the square map that :func:`to_map` makes at ``exit_point`` (H of a CNN map)."""
    shape = exit_point.feature_shape
    if len(shape) == 2:
        return math.isqrt(shape[0] - exit_point.prefix_tokens)
    return shape[0] if exit_point.channels_last else shape[1]


class MixedPool(nn.Module):
    """SDN's mixed pooling: ``alpha * maxpool(x) + (1 - alpha) * avgpool(x)`` down to ``size x size``.

    ``alpha`` is one learned, unconstrained scalar drawn from U(0, 1) at init, as in the SDN code
    (Lee et al. 2016's "mixed" pooling). Pooling is adaptive so any map larger than ``size`` reduces to
    exactly ``size x size`` (the reference uses kernel = stride = side // 4, which drops border
    pixels when the side is not a multiple of 4 and leaves 5-7 px maps unreduced). Maps with side
    <= ``size`` pass through unchanged and have no ``alpha`` (the reference does the same below 4 px).
    """

    def __init__(self, in_side: int, size: int = 4):
        super().__init__()
        self.size = size
        pools = in_side > size
        self.out_side = size if pools else in_side
        self.alpha = nn.Parameter(torch.rand(1)) if pools else None

    def forward(self, x: Tensor) -> Tensor:
        if self.alpha is None:
            return x
        mx = nn.functional.adaptive_max_pool2d(x, self.size)
        avg = nn.functional.adaptive_avg_pool2d(x, self.size)
        return self.alpha * mx + (1 - self.alpha) * avg


class SDNHead(nn.Module):
    """SDN's internal classifier: mixed max/avg pooling to a small map, flatten, Linear -> logits."""

    def __init__(self, exit_point: ExitPoint, num_classes: int, pool_size: int = 4):
        super().__init__()
        self.adapt = to_map(exit_point)
        self.pool = MixedPool(map_side(exit_point), pool_size)
        self.classifier = nn.Linear(exit_point.channels * self.pool.out_side ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.adapt(x)).flatten(1))
