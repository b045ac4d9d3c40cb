"""Shared fixtures: a tiny hand-built staged backbone (pure torch, independent of timm) and
environment isolation (no writes to the user's cache)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitbench.benchmarks.contract import midpoint_thresholds  # noqa: F401  (shared with the tests)
from exitbench.benchmarks.traces import Trace
from exitbench.methods.base import ExitPoint, StagedBackbone


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXITBENCH_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)


def cell_config(**kw) -> dict:
    """A stored cell config (``CellResult.config`` as JSON) with every required field; ``kw`` overrides."""
    return {"dataset": "d", "backbone": "b", "weights": "train", "small_stem": None, "method": "m", "hparams": {},
            "seed": 0, **kw}


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def tiny_backbone(num_classes: int = 5, side: int = 16) -> StagedBackbone:
    """Four conv blocks and a pool+linear head, with exit-point candidates filled in by hand
    (MACs computed from the conv shapes)."""
    specs = [(3, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1)]
    blocks = [_block(*s) for s in specs]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    bb = StagedBackbone(blocks, [f"b{i}" for i in range(4)], head, name="tiny", num_classes=num_classes,
                        input_size=(3, side, side))
    s, macs, cum = side, [], 0
    for i, (cin, cout, stride) in enumerate(specs):
        s //= stride
        macs.append(cin * cout * 9 * s * s)
        cum += macs[-1]
        if i < 3:
            bb.candidates.append(ExitPoint(i, f"b{i}", cout, (cout, s, s), cum))
    bb.block_macs, bb.head_macs = macs, 16 * num_classes
    bb.macs = sum(macs) + bb.head_macs
    for m in bb.modules():  # non-trivial BatchNorm statistics so that eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return bb.eval()


@pytest.fixture
def tiny():
    return tiny_backbone()


def synthetic_trace(n: int = 800, exits: int = 4, classes: int = 5, seed: int = 0) -> Trace:
    """A trace whose later exits are more often right (random logits + a growing true-class boost)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(exits, n, classes, generator=g)
    for e in range(exits):
        logits[e, torch.arange(n), labels] += (0.8 + 0.8 * e) * torch.rand(n, generator=g) * 4
    return Trace(logits, labels)
