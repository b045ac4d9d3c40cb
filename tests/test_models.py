"""The paper backbones exitbench registers with timm: created by name, the published sizes (He et al. 2016's
CIFAR ResNets, DenseNet-BC k=12), and cut by the ordinary timm path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitbench.benchmarks.backbones import create_backbone
from exitbench.benchmarks.models import timm


def _conv_linear_macs(model: nn.Module, side: int = 32) -> int:
    """Multiply-accumulates of the convolutions and linear layers only (how the papers count), batch 1."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize(("name", "published_macs", "published_params"), [
    ("cifar_resnet20", 40.8e6, 0.27e6),  # He et al. 2016, table 6: 0.27 M parameters
    ("cifar_resnet56", 125e6, 0.85e6),
    ("cifar_resnet110", 253e6, 1.7e6),
    ("cifar_densenet_bc100", 288e6, 0.8e6),  # Huang et al. 2017, table 2: 0.8 M parameters
])
def test_published_sizes(name, published_macs, published_params):
    model = timm.create_model(name, num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    # the 1x1 projection shortcuts (option B) add ~1 % of parameters to the small ResNets
    assert abs(params - published_params) / published_params < 0.05, params
    assert abs(_conv_linear_macs(model) - published_macs) / published_macs < 0.02, _conv_linear_macs(model)


def test_registered_like_any_timm_model():
    names = {f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)} | {"cifar_densenet_bc100"}
    assert names <= set(timm.list_models("cifar*"))
    assert not timm.list_pretrained("cifar*")  # no weights: they train in the harness
    m = timm.create_model("cifar_resnet32", num_classes=100)
    assert m.fc.out_features == 100 and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m.feature_info[-1] == {"num_chs": 64, "reduction": 4, "module": "layer3"}


@pytest.mark.parametrize(("name", "n_blocks", "example"), [
    ("cifar_resnet56", 27, "layer2.4"), ("cifar_resnet110", 54, "layer3.17"),
    ("cifar_densenet_bc100", 48, "denseblock2.layer5")])
def test_cut_equals_timm_forward(name, n_blocks, example):
    torch.manual_seed(0)
    bb = create_backbone(name, 10, input_size=(3, 32, 32)).eval()
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb(x), ref(x), atol=1e-5)
    assert len(bb.blocks) == n_blocks and example in bb.block_names and bb.family in ("resnet", "densenet")
    assert bb.candidates[0].feature_shape[1:] == (32, 32)  # the CIFAR stem keeps the resolution
    assert sum(bb.block_macs) + bb.head_macs == bb.macs
