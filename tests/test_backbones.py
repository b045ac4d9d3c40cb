"""exitbench.benchmarks.backbones: the cut equals timm's forward, candidates, small stems, weights files, errors."""

from __future__ import annotations

from functools import cache

import pytest
import timm
import torch
from safetensors.torch import save_file

from exitbench.benchmarks import backbones
from exitbench.benchmarks.backbones import (
    BACKBONE_FAMILIES,
    TESTED_BACKBONES,
    create_backbone,
    create_timm_model,
    load_weights,
    resolve_small_stem,
    save_weights,
    stage_model,
)
from exitbench.methods.base import StagedBackbone, UserError
from exitbench.methods.heads import to_map

# (timm name, input side, small stem): tiny or small-input models of every family, both stems
CASES = [
    ("test_resnet", 32, True),
    ("test_resnet", 32, False),
    ("resnet10t", 32, True),  # deep stem: first conv stride 1, no max-pool
    ("densenet121", 16, True),  # 16 px keeps the full-resolution dense block cheap
    ("densenet121", 32, False),
    ("vgg11_bn", 32, None),
    ("test_efficientnet", 32, True),
    ("test_efficientnet", 64, False),
    ("mobilenetv3_small_050", 32, True),
    ("mobilenetv3_small_050", 32, False),
    ("test_vit", 32, True),  # patch 4 -> 64 patches + class token
    ("test_vit", 32, False),  # patch 16 -> 2x2 grid
    ("test_vit2", 32, True),  # register tokens, average pooling
]
# the generic rule (benchmarks.generic_cut), one model per family, at 32 px: the stem as timm builds it
GENERIC = [
    ("test_convnext", 32, None),  # stages.N.blocks.M, a downsample opening each stage
    ("regnetx_002", 32, None),  # s1..s4 of b1..bN
    ("test_byobnet", 32, None),  # stages.N.M
    ("swin_tiny_patch4_window7_224", 32, None),  # channels-last (H, W, C) maps; img_size at creation
    ("efficientvit_m0", 32, None),
    ("efficientvit_b0", 32, None),
    ("levit_128s", 32, None),  # tokens without prefix; a distilled head (two classifiers averaged)
    ("ghostnet_050", 32, None),  # blocks.N.M
]
CASES += GENERIC


@cache  # built once per case; the tests only read them
def _staged(name: str, side: int, small: bool | None) -> tuple[torch.nn.Module, StagedBackbone]:
    torch.manual_seed(0)
    model = create_timm_model(name, 10, (3, side, side), small_stem=small)
    return model, stage_model(model, name=name, num_classes=10, input_size=(3, side, side))


@pytest.mark.parametrize(("name", "side", "small"), CASES, ids=lambda v: str(v))
def test_blocks_then_head_equal_timm_forward(name, side, small):
    model, bb = _staged(name, side, small)
    model.eval()
    bb.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = model(x)
        h = x
        for block in bb.blocks:
            h = block(h)
        out = bb.head(h)
    assert out.shape == (2, 10)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    if bb.cut_rule == "generic":
        assert bb.small_stem is False and torch.equal(out, ref)  # the same graph, node for node
    else:
        assert bb.small_stem == resolve_small_stem((3, side, side), small)


@pytest.mark.parametrize(("name", "side", "small"), CASES, ids=lambda v: str(v))
def test_candidates_are_consistent(name, side, small):
    _, bb = _staged(name, side, small)
    assert len(bb.candidates) == len(bb.blocks) - 1 >= 3
    assert [c.name for c in bb.candidates] == bb.block_names[:-1]
    assert len(set(bb.block_names)) == len(bb.block_names)
    assert [c.index for c in bb.candidates] == list(range(len(bb.blocks) - 1))
    bb.eval()
    with torch.no_grad():
        h = torch.zeros(1, 3, side, side)
        for block, cand in zip(bb.blocks, bb.candidates):
            h = block(h)
            assert tuple(h.shape[1:]) == cand.feature_shape
            last = h.dim() == 3 or cand.channels_last  # tokens (B, T, C) or a channels-last map (B, H, W, C)
            assert cand.channels == (h.shape[-1] if last else h.shape[1])
            assert to_map(cand)(h).shape[:2] == (1, cand.channels) and to_map(cand)(h).dim() == 4
    cumulative = [c.macs_cumulative for c in bb.candidates]
    assert all(a < b for a, b in zip(cumulative, cumulative[1:]))
    assert cumulative[-1] < bb.macs
    assert len(bb.block_macs) == len(bb.blocks) and bb.head_macs > 0
    if bb.family == "vit":
        assert {c.prefix_tokens for c in bb.candidates} == {bb.prefix_tokens} and bb.prefix_tokens >= 1
    elif bb.family != "levit":
        assert all(c.prefix_tokens == 0 and len(c.feature_shape) == 3 for c in bb.candidates)
    assert any(c.channels_last for c in bb.candidates) == (bb.family == "swin_transformer")


def test_small_stem_keeps_resolution():
    _, small = _staged("test_resnet", 32, True)
    _, plain = _staged("test_resnet", 32, False)
    assert small.candidates[0].feature_shape[1:] == (32, 32)  # 3x3 stride 1, no max-pool
    assert plain.candidates[0].feature_shape[1:] == (8, 8)  # stride-2 conv + max-pool
    _, vit = _staged("test_vit", 32, True)
    assert vit.candidates[0].feature_shape[0] == 64 + 1  # (32 / 4)^2 patches + class token
    assert resolve_small_stem((3, 64, 64), None) and not resolve_small_stem((3, 96, 96), None)
    assert not resolve_small_stem((3, 32, 32), False) and resolve_small_stem((3, 224, 224), True)


# The backbones of the paper matrix at 32 px with the small stem: block counts and example names.
PAPER_CUTS = [
    ("resnet18", 8, "layer2.1"),
    ("densenet121", 58, "denseblock2.layer5"),
    ("vgg16_bn", 5, "stage3"),
    ("efficientnet_b0", 16, "blocks.3.1"),
    ("mobilenetv3_small_100", 12, "blocks.3.1"),
    ("vit_tiny_patch16_224", 12, "blocks.7"),
]


@pytest.mark.parametrize(("name", "n_blocks", "example"), PAPER_CUTS, ids=[c[0] for c in PAPER_CUTS])
def test_paper_backbones_cut(name, n_blocks, example):
    bb = create_backbone(name, 10)
    assert len(bb.blocks) == n_blocks
    assert example in bb.block_names
    assert bb.small_stem and bb.num_classes == 10 and bb.name == name
    assert sum(bb.block_macs) + bb.head_macs == bb.macs


def test_no_profiler_hooks_left_behind():
    bb = create_backbone("test_resnet", 10)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bb.modules())


def test_families_and_tested_names():
    from exitbench.benchmarks.models import timm as registered

    assert set(BACKBONE_FAMILIES.names()) == {"resnet", "densenet", "vgg", "efficientnet", "mobilenetv3", "vit"}
    assert all(registered.is_model(n) for n in TESTED_BACKBONES)


# ----------------------------------------------------------------------------------------------
# Weights


def _random_timm(name: str, small: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_timm_model(name, 10, (3, 32, 32), small_stem=small)
    with torch.no_grad():  # non-trivial BN statistics so a wrong load would show
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(("name", "small"), [("test_resnet", False), ("test_resnet", True), ("test_vit", True),
                                             ("mobilenetv3_small_050", True)])
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pt_nested"])
def test_weights_file_round_trip(tmp_path, name, small, fmt):
    model = _random_timm(name, small)
    state = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "w.pt"
        torch.save({"state_dict": state, "epoch": 3}, path)
    bb = create_backbone(name, 10, small_stem=small, weights=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb(x), model(x))


def test_save_and_load_staged_weights(tmp_path):
    torch.manual_seed(2)
    bb = create_backbone("test_efficientnet", 10).eval()
    path = tmp_path / "cache" / "bb.safetensors"
    save_weights(bb, path)
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # no temporary file left
    torch.manual_seed(3)
    other = create_backbone("test_efficientnet", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(other(x), bb(x))
        load_weights(other, path)
        assert torch.equal(other(x), bb(x))
        # a file written by save_weights also works as `weights: PATH`
        assert torch.equal(create_backbone("test_efficientnet", 10, weights=path).eval()(x), bb(x))


# ----------------------------------------------------------------------------------------------
# Errors: one line, says what and what to do


def _user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_name_suggests():
    assert "did you mean 'resnet18'" in _user_error(create_backbone, "resnt18", 10)
    assert "resnet18.a1_in1k" in _user_error(create_backbone, "resnet18.a1_in1", 10)


def test_what_the_generic_rule_cannot_cut_is_a_one_line_error():
    msg = _user_error(create_backbone, "inception_v3", 10)  # Mixed_5b, ...: no stages of blocks
    assert msg.startswith("backbone: 'inception_v3' (InceptionV3) has no stages of blocks") and "\n" not in msg
    msg = _user_error(create_backbone, "tnt_s_patch16_224", 10)  # two tensors (pixel and patch) flow on
    assert "fewer than two block boundaries where one tensor flows" in msg
    assert "small_stem is not available" in _user_error(create_backbone, "test_convnext", 10, small_stem=True)


def test_bad_arguments():
    assert "num_classes" in _user_error(create_backbone, "test_resnet", 0)
    assert "input_size" in _user_error(create_backbone, "test_resnet", 10, input_size=(3, 32))
    assert "not both" in _user_error(create_backbone, "test_resnet", 10, pretrained=True, weights="x.pth")


def test_bad_weights_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    msg = _user_error(create_backbone, "test_resnet", 10, weights=missing)
    assert str(missing) in msg and "weights: train" in msg
    other = tmp_path / "other.pth"
    torch.save(_random_timm("test_efficientnet", True).state_dict(), other)
    msg = _user_error(create_backbone, "test_resnet", 10, weights=other)
    assert str(other) in msg and "missing keys" in msg and "unexpected keys" in msg
    classes = tmp_path / "classes.safetensors"
    save_file(_random_timm("test_resnet", True).state_dict(), str(classes))
    msg = _user_error(create_backbone, "test_resnet", 5, weights=classes)
    assert "shape mismatches" in msg and "'fc.weight'" in msg and "num_classes" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert "weights-only" in _user_error(create_backbone, "test_resnet", 10, weights=junk)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module, not a state_dict
    assert "weights-only" in _user_error(create_backbone, "test_resnet", 10, weights=pickled)
    text = tmp_path / "w.txt"
    text.write_text("x")
    assert "suffix" in _user_error(create_backbone, "test_resnet", 10, weights=text)
    staged = tmp_path / "staged.safetensors"
    save_weights(create_backbone("test_resnet", 10), staged)
    assert "test_resnet" in _user_error(load_weights, create_backbone("test_efficientnet", 10), staged)


def test_pretrained_download_failure_is_a_user_error(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:  # what huggingface_hub raises without a network (after ~45 s of retries)
            raise OSError("An error happened while trying to locate the file on the Hub.")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    msg = _user_error(backbones.create_backbone, "test_resnet", 10, pretrained=True)
    assert "could not be downloaded" in msg and "weights: PATH" in msg and "weights: train" in msg


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "levit_128s", "test_convnext"])
def test_methods_build_on_generically_cut_backbones(name):
    """Channels-last maps (Swin), prefix-free tokens (LeViT) and NCHW maps reach every head as [B, C, H, W]."""
    from exitbench.methods.base import get_method
    from exitbench.methods.policies import ThresholdPolicy

    _, bb = _staged(name, 32, None)
    bb.eval()
    x = torch.randn(3, 3, 32, 32)
    for method in ("pteenet", "sdn", "branchynet"):
        m = get_method(method)(n_exits=2, placement=[bb.candidates[0].name, bb.candidates[-1].name])
        net = m.build(bb, m.place_exits(bb), 10).eval()
        with torch.no_grad():
            assert [lg.shape for lg in net.forward_all(x).logits] == [(3, 10)] * 3
            logits, exit_idx = net.forward_dynamic(x, ThresholdPolicy("max_softmax", (0.0, 2.0)))
        assert logits.shape == (3, 10) and exit_idx.tolist() == [0, 0, 0]
