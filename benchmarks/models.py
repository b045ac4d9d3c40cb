"""timm models the early-exit papers use that timm lacks, registered with timm's own ``register_model``.

Once this module is imported, ``timm.create_model("cifar_resnet110", num_classes=10)`` works like any timm
model; the harness gets timm from here (``from exitbench.benchmarks.models import timm``), so every name a
matrix gives is checked against the registry with these in it, and exitbench cuts,
counts and places exits on it through the ordinary timm path (these are timm ``ResNet`` / ``DenseNet``
instances, not look-alikes).

- ``cifar_resnet{20,32,44,56,110}``: He et al. 2016 ("Deep Residual Learning", section 4.2): a 3x3
  stride-1 stem of 16 channels, no stem pool, three stages of (depth - 2) / 6 basic blocks with 16, 32
  and 64 channels (strides 1, 2, 2), global average pool, one linear layer. Departure: the downsampling
  shortcut is timm's 1x1 convolution + BN (the paper's option B) rather than option A's zero padding;
  it adds about 0.26 M MACs to every depth (ResNet-110: 253 M in all at 32 px, 1.7 M parameters).
- ``cifar_densenet_bc100``: Huang et al. 2017's DenseNet-BC (k = 12, depth 100: three dense blocks of
  16 bottleneck layers, compression 0.5) on a 3x3 stride-1 stem of 2k channels without a pool.

None has pretrained weights: they train in the harness (``weights: train``).
"""

from __future__ import annotations

from typing import Any

import timm  # noqa: F401  (re-exported: the harness's timm, with these models registered)
from torch import nn

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


def _cfg(**kw: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1", "classifier": "fc", **kw}


# timm reads a registering module's ``default_cfgs`` (one per model name): no url, so never "pretrained"
default_cfgs = {f"cifar_resnet{d}": _cfg() for d in CIFAR_RESNET_DEPTHS}
default_cfgs["cifar_densenet_bc100"] = _cfg(first_conv="features.conv0", classifier="classifier")


def _small_stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def _no_stem_reduction(model: nn.Module) -> None:
    for info in model.feature_info:  # neither the stem's stride 2 nor its pool any more
        info["reduction"] = max(1, info["reduction"] // 4)


def _cifar_resnet(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    from timm.models import build_model_with_cfg
    from timm.models.resnet import BasicBlock, ResNet

    n = (depth - 2) // 6
    # timm's plain stem is always 64 wide; its deep stem ends at 2 x stem_width = 16 channels, so layer1
    # is built for 16 inputs (no projection), and the deep stem is then replaced by one 3x3 conv
    model = build_model_with_cfg(ResNet, variant, pretrained, block=BasicBlock, layers=(n, n, n),
                                 channels=(16, 32, 64), stem_type="deep", stem_width=8, **kwargs)
    model.conv1 = _small_stem(model.conv1[0].in_channels, 16)
    model.maxpool = nn.Identity()
    model.layer4 = nn.Identity()  # timm's ResNet.forward_features calls layer1..layer4; three stages here
    _no_stem_reduction(model)
    return model


def _register() -> None:
    from timm.models import register_model

    def entry(depth: int):
        def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return _cifar_resnet(f"cifar_resnet{depth}", depth, pretrained, **kwargs)
        fn.__name__ = f"cifar_resnet{depth}"
        fn.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, section 4.2; exitbench.benchmarks.models)"
        fn.__module__ = __name__
        return fn

    for depth in CIFAR_RESNET_DEPTHS:
        register_model(entry(depth))

    def cifar_densenet_bc100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        """DenseNet-BC (k=12, depth 100) for 32 px inputs (Huang et al. 2017; exitbench.benchmarks.models)."""
        from timm.models import build_model_with_cfg
        from timm.models.densenet import DenseNet

        model = build_model_with_cfg(DenseNet, "cifar_densenet_bc100", pretrained, growth_rate=12,
                                     block_config=(16, 16, 16), **kwargs)
        conv0 = model.features.conv0
        model.features.conv0 = _small_stem(conv0.in_channels, conv0.out_channels)
        model.features.pool0 = nn.Identity()
        _no_stem_reduction(model)
        return model

    cifar_densenet_bc100.__module__ = __name__
    register_model(cifar_densenet_bc100)


_register()
