"""exitbench.benchmarks.flops: MACs invariants, counter cross-check, known values, cost tables."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import timm
import torch
from torch import nn

from exitbench.benchmarks.backbones import create_backbone, create_timm_model
from exitbench.benchmarks.flops import (
    CostTable,
    cost_table,
    count_macs,
    expected_rel_macs,
    flop_counter_macs,
    head_macs,
)
from exitbench.methods.base import StagedBackbone, UserError, place_exits


@cache
def _backbone(name: str, side: int = 32, small: bool | None = None, classes: int = 10) -> StagedBackbone:
    return create_backbone(name, classes, (3, side, side), small_stem=small)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit", "mobilenetv3_small_050",
                                  "densenet121"])
def test_blocks_sum_to_whole_network(name):
    bb = _backbone(name)
    model = create_timm_model(name, 10, (3, 32, 32))  # same architecture, counted in one piece
    assert sum(bb.block_macs) + bb.head_macs == bb.macs == count_macs(model, (3, 32, 32))
    cumulative = [c.macs_cumulative for c in bb.candidates]
    assert cumulative == list(np.cumsum(bb.block_macs[:-1]))
    assert all(a < b for a, b in zip(cumulative, cumulative[1:]))


def test_ptflops_aten_agrees_with_flop_counter_on_cnns():
    for name in ("resnet18", "test_efficientnet"):
        bb = _backbone(name)
        reference = flop_counter_macs(bb, (3, 32, 32))
        assert abs(bb.macs - reference) / reference < 0.01, (name, bb.macs, reference)


def _linear_macs(vit: nn.Module, tokens: int) -> tuple[int, int]:
    """Analytic (MACs, bias adds) of a timm ViT without attention: patch-embed conv, every block
    Linear on all tokens, the classifier on the pooled token. ptflops-aten counts bias adds, so its
    MACs are the sum; FlopCounterMode does not."""
    pe = vit.patch_embed.proj
    patches = vit.patch_embed.num_patches
    macs, bias = patches * pe.out_channels * pe.in_channels * math.prod(pe.kernel_size), patches * pe.out_channels
    for m in vit.blocks.modules():
        if isinstance(m, nn.Linear):
            macs += tokens * m.in_features * m.out_features
            bias += tokens * m.out_features * (m.bias is not None)
    return macs + vit.head.in_features * vit.head.out_features, bias + vit.head.out_features


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "test_vit2"])  # test_vit2 has register tokens
@pytest.mark.parametrize("fused", [True, False])
def test_vit_macs_count_attention_analytically(name, fused):
    # QK^T and AV are counted the same whether timm runs fused SDPA or the unfused matmuls, on any torch
    vit = create_timm_model(name, 10, (3, 32, 32))
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    dim, depth = vit.embed_dim, len(vit.blocks)
    linear, bias = _linear_macs(vit, tokens)
    attention = depth * 2 * tokens * tokens * dim
    assert count_macs(vit, (3, 32, 32)) == linear + bias + attention
    if name == "vit_tiny_patch16_224":  # 346.99 M without attention, as ptflops-aten alone reports
        assert tokens == 65 and linear + bias == 346_998_922 and attention == 19_468_800
    # the cross-check sees the same attention and differs from ptflops-aten by the bias adds only
    assert flop_counter_macs(vit, (3, 32, 32)) == linear + attention


def test_staged_vit_equals_whole_vit():
    bb = _backbone("test_vit2")
    assert bb.macs == count_macs(create_timm_model("test_vit2", 10, (3, 32, 32)), (3, 32, 32))


def test_count_macs_leaves_module_as_it_was():
    head = nn.Sequential(nn.LayerNorm(192), nn.Flatten(), nn.Linear(65 * 192, 10))
    head.train()
    assert count_macs(head, (65, 192)) == 65 * 192 * 10 + 10  # tokens input; linear + bias
    assert head.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in head.modules())


# ----------------------------------------------------------------------------------------------
# Known values (docs/measurement.md)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "gmacs"), [("resnet18", 1.82), ("resnet50", 4.1), ("densenet121", 2.87),
                                             ("vgg16_bn", 15.5)])
def test_known_imagenet_values(name, gmacs):
    bb = create_backbone(name, 1000, (3, 224, 224), small_stem=False, pretrained=False)
    assert abs(bb.macs / 1e9 - gmacs) / gmacs < 0.02, bb.macs


@pytest.mark.parametrize(("name", "mmacs"), [("resnet18", 555.4), ("densenet121", 888.4), ("vgg16_bn", 432.8)])
def test_known_small_input_values(name, mmacs):
    bb = _backbone(name)
    assert abs(bb.macs / 1e6 - mmacs) / mmacs < 0.01, bb.macs
    if name == "vgg16_bn":  # timm's 7x7 conv "pre-logits" on a 1x1 map upsampled to 7x7
        assert abs(bb.head_macs / 1e6 - 119.6) < 0.1


# ----------------------------------------------------------------------------------------------
# Cost tables


def _linear_head(channels: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@pytest.fixture(scope="module")
def table() -> tuple[StagedBackbone, list, list[int], CostTable]:
    bb = _backbone("resnet18")
    exits = place_exits(bb.candidates, bb.macs, 3, "linear")
    heads = [head_macs(_linear_head(e.channels), e) for e in exits]
    return bb, exits, heads, cost_table(bb, exits, heads)


def test_cost_table_accountings(table):
    bb, exits, heads, t = table
    n = len(exits)
    assert len(t.paper) == len(t.strict) == len(t.macs_paper) == len(t.macs_strict) == n + 1
    assert t.paper[-1] == 1.0 and t.macs_paper[-1] == bb.macs
    assert all(s >= p for s, p in zip(t.strict, t.paper))
    assert t.macs_strict[-1] == bb.macs + sum(heads)
    for k, e in enumerate(exits):
        assert t.macs_paper[k] == e.macs_cumulative + heads[k]
        assert t.macs_strict[k] == e.macs_cumulative + sum(heads[: k + 1])
        assert t.paper[k] == pytest.approx((e.macs_cumulative + heads[k]) / bb.macs)
    assert all(a < b for a, b in zip(t.paper, t.paper[1:]))


def test_head_macs_of_a_linear_head(table):
    _, exits, heads, _ = table
    e = exits[0]
    assert heads[0] == e.channels * 10 + 10  # pooling costs no MACs; linear + bias


def test_expected_rel_macs(table):
    _, _, _, t = table
    n = len(t.paper)
    all_final = np.eye(n)[-1]
    assert expected_rel_macs(all_final, t, "paper") == 1.0
    assert expected_rel_macs(all_final, t, "strict") == t.strict[-1]
    half = np.array([0.5, 0.0, 0.25, 0.25])
    assert expected_rel_macs(half, t, "paper") == pytest.approx(0.5 * t.paper[0] + 0.25 * t.paper[2] + 0.25)
    grid = np.stack([all_final, half])
    assert np.allclose(expected_rel_macs(grid, t, "paper"), [1.0, expected_rel_macs(half, t, "paper")])
    with pytest.raises(UserError, match="accounting"):
        expected_rel_macs(all_final, t, "paperr")
    with pytest.raises(ValueError):
        expected_rel_macs(np.ones(n + 1) / (n + 1), t, "paper")


def test_cost_table_needs_matching_heads(table):
    bb, exits, heads, _ = table
    with pytest.raises(ValueError):
        cost_table(bb, exits, heads[:-1])


def test_timm_unchanged_by_counting():
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        count_macs(model, (3, 32, 32))
        flop_counter_macs(model, (3, 32, 32))
        assert torch.equal(model(x), before)
