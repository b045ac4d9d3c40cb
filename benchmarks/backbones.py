"""timm classifiers -> staged backbones: blocks, exit-point candidates, small-image stem, weights.

A *backbone* is a timm model cut at block boundaries into a :class:`methods.base.StagedBackbone`
whose ``head(blocks[-1](...blocks[0](x)))`` is the timm model's own ``forward(x)``. The blocks reuse
timm's modules (no copies), so timm's code does the work and the cut cannot drift from it:

| family       | timm class          | one block per                      | block names           |
|--------------|---------------------|------------------------------------|-----------------------|
| resnet       | ResNet              | residual block of layer1..4        | ``layer2.1``          |
| densenet     | DenseNet            | dense layer: x -> cat([x, f(x)])   | ``denseblock2.layer5``|
| vgg          | VGG                 | conv group ending in a max-pool    | ``stage3``            |
| efficientnet | EfficientNet        | block inside ``blocks``            | ``blocks.3.1``        |
| mobilenetv3  | MobileNetV3         | block inside ``blocks``            | ``blocks.3.1``        |
| vit          | VisionTransformer   | transformer block                  | ``blocks.7``          |

Every other timm classifier built as stem -> stages -> blocks -> head (ConvNeXt, RegNet, ByobNet, Swin,
EfficientViT, LeViT, GhostNet, MLP-Mixer, ...) is cut by one generic rule, :mod:`generic_cut`: blocks
found by name, the model's own forward traced with torch.fx and cut where one tensor flows. Its family is
the model's timm module (``convnext``, ``swin_transformer``); it has no small-image stem.

``blocks[0]`` starts with the stem (ViT: patch_embed, _pos_embed, patch_drop, norm_pre). A DenseNet
transition opens the block after it, so an exit after a dense block sees the dense block's output
(timm's feature taps). ``head`` is everything after the last block: final norm / conv_head /
pre-logits, pooling, dropout and the classifier.

Small-image stem (default on for inputs of 64 px or less): ResNet and DenseNet get a 3x3 stride-1
first conv and no stem pool (deep-stem variants such as resnet10t keep their 3x3 convs and only
lose the first stride and the pool); EfficientNet / MobileNetV3 get a stride-1 ``conv_stem``; ViTs are
created with ``img_size`` = the input and ``patch_size=4``; VGG is unchanged (its first conv is 3x3
stride 1 already).
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from exitbench.benchmarks import flops
from exitbench.benchmarks.generic_cut import cut_generic
from exitbench.core.registry import Registry
from exitbench.core.store import write_atomic
from exitbench.methods.base import ExitPoint, StagedBackbone, UserError, did_you_mean

# timm is imported inside the functions: importing it costs seconds, and `exitbench list` needs only
# the constants below.

# The timm models the tests build and check block by block (tests/test_backbones.py, tests/test_flops.py).
TESTED_BACKBONES = (
    "test_resnet", "test_efficientnet", "test_vit", "test_vit2", "resnet10t", "resnet18", "resnet50",
    "densenet121", "vgg11_bn", "vgg16_bn", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv3_small_100",
    "vit_tiny_patch16_224", "cifar_resnet56", "cifar_resnet110", "cifar_densenet_bc100",  # benchmarks.models
    # the generic rule (benchmarks.generic_cut)
    "test_convnext", "regnetx_002", "test_byobnet", "swin_tiny_patch4_window7_224", "efficientvit_m0",
    "efficientvit_b0", "levit_128s", "ghostnet_050",
)

SMALL_INPUT_MAX_SIDE = 64
VIT_SMALL_PATCH = 4
_VIT_MODULES = ("vision_transformer", "deit")  # timm modules whose models are plain VisionTransformers
_WEIGHTS_HINT = "or `weights: train` to train the backbone in the harness"


# ----------------------------------------------------------------------------------------------
# Modules the cut is made of (thin wrappers around timm's own modules)


class _DenseStep(nn.Module):
    """One DenseNet layer as a block: ``x -> cat([x, layer(x)])``, after an optional ``pre``
    (the stem or a transition). timm's DenseBlock concatenates the same tensors, so this is exact."""

    def __init__(self, layer: nn.Module, pre: nn.Module | None = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        return torch.cat([x, self.layer(x)], 1)


class _VitEmbed(nn.Module):
    """ViT input side: patch_embed, _pos_embed (timm's own code), patch_drop, norm_pre."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        for attr in ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre",
                     "dynamic_img_size", "no_embed_class", "num_prefix_tokens"):
            setattr(self, attr, getattr(vit, attr))

    def forward(self, x: Tensor) -> Tensor:
        from timm.models.vision_transformer import VisionTransformer

        x = self.patch_embed(x)
        x = VisionTransformer._pos_embed(self, x)  # reuse timm's code; it reads only the attributes set above
        x = self.patch_drop(x)
        return self.norm_pre(x)


class _VitHead(nn.Module):
    """ViT output side: norm, pool (timm's own code), fc_norm, head_drop, head."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        for attr in ("norm", "attn_pool", "fc_norm", "head_drop", "head", "global_pool", "num_prefix_tokens"):
            setattr(self, attr, getattr(vit, attr))
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)  # timm >= 1.0.16 only

    def forward(self, x: Tensor) -> Tensor:
        from timm.models.vision_transformer import VisionTransformer

        x = VisionTransformer.pool(self, self.norm(x))
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


# ----------------------------------------------------------------------------------------------
# Small-image stems (in place on the timm model)


def _stride1_stem(conv: nn.Module) -> nn.Module:
    """The stem conv at stride 1: a large kernel (7x7) becomes 3x3 stride 1, a 3x3 keeps its weights."""
    if isinstance(conv, nn.Sequential):  # deep stem: only its first conv downsamples
        first = next(i for i, m in enumerate(conv) if isinstance(m, nn.Conv2d))
        conv[first] = _stride1_stem(conv[first])
        return conv
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"cannot make a stride-1 stem from {type(conv).__name__}")
    if conv.kernel_size[0] > 3:
        w = conv.weight
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None,
                        device=w.device, dtype=w.dtype)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        return new
    conv.stride = (1, 1)  # timm pads a 3x3 conv by 1 at stride 1 and 2, so the padding stays right
    return conv


def _small_stem_resnet(m: nn.Module) -> None:
    m.conv1 = _stride1_stem(m.conv1)
    m.maxpool = nn.Identity()


def _small_stem_densenet(m: nn.Module) -> None:
    m.features.conv0 = _stride1_stem(m.features.conv0)
    m.features.pool0 = nn.Identity()


def _small_stem_conv_stem(m: nn.Module) -> None:
    m.conv_stem = _stride1_stem(m.conv_stem)


def _no_change(m: nn.Module) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Cuts: timm model -> (blocks, block names, head)

Cut = tuple[list[nn.Module], list[str], nn.Module]


def _cut_resnet(m: nn.Module) -> Cut:
    blocks, names = [], []
    for lname, layer in m.named_children():
        if lname.startswith("layer") and isinstance(layer, nn.Sequential):  # CIFAR ResNets: layer4 = Identity
            for j, block in enumerate(layer):
                blocks.append(block)
                names.append(f"{lname}.{j}")
    stem = _seq(conv1=m.conv1, bn1=m.bn1, act1=m.act1, maxpool=m.maxpool)
    blocks[0] = _seq(stem=stem, block=blocks[0])
    return blocks, names, _seq(global_pool=m.global_pool, drop=nn.Dropout(float(m.drop_rate)), fc=m.fc)


def _cut_densenet(m: nn.Module) -> Cut:
    blocks, names, pending = [], [], OrderedDict()
    for cname, child in m.features.named_children():
        if not cname.startswith("denseblock"):
            pending[cname] = child  # stem, transition or the final norm: folded into what follows
            continue
        for lname, layer in child.items():
            blocks.append(_DenseStep(layer, nn.Sequential(pending) if pending else None))
            names.append(f"{cname}.layer{lname.removeprefix('denselayer')}")
            pending = OrderedDict()
    head = _seq(**pending, global_pool=m.global_pool, head_drop=m.head_drop, classifier=m.classifier)
    return blocks, names, head


def _cut_vgg(m: nn.Module) -> Cut:
    blocks, names, group = [], [], OrderedDict()
    for idx, layer in m.features.named_children():
        group[idx] = layer  # keep timm's indices as names: blocks.2.7 is features.7
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(group))
            names.append(f"stage{len(blocks)}")
            group = OrderedDict()
    if group:  # layers after the last pool (none in timm's configs) stay with the last block
        blocks[-1] = nn.Sequential(OrderedDict([*blocks[-1].named_children(), *group.items()]))
    return blocks, names, _seq(pre_logits=m.pre_logits, head=m.head)


def _inverted_residual_blocks(m: nn.Module) -> tuple[list[nn.Module], list[str]]:
    blocks, names = [], []
    for s, stage in enumerate(m.blocks):
        for i, block in enumerate(stage):
            blocks.append(block)
            names.append(f"blocks.{s}.{i}")
    blocks[0] = _seq(stem=_seq(conv_stem=m.conv_stem, bn1=m.bn1), block=blocks[0])
    return blocks, names


def _cut_efficientnet(m: nn.Module) -> Cut:
    blocks, names = _inverted_residual_blocks(m)
    head = _seq(conv_head=m.conv_head, bn2=m.bn2, global_pool=m.global_pool, drop=nn.Dropout(float(m.drop_rate)),
                classifier=m.classifier)
    return blocks, names, head


def _cut_mobilenetv3(m: nn.Module) -> Cut:
    blocks, names = _inverted_residual_blocks(m)
    head = _seq(global_pool=m.global_pool, conv_head=m.conv_head, norm_head=m.norm_head, act2=m.act2,
                flatten=m.flatten, drop=nn.Dropout(float(m.drop_rate)), classifier=m.classifier)
    return blocks, names, head


def _cut_vit(m: nn.Module) -> Cut:
    blocks = list(m.blocks)
    names = [f"blocks.{i}" for i in range(len(blocks))]
    blocks[0] = _seq(embed=_VitEmbed(m), block=blocks[0])
    return blocks, names, _VitHead(m)


@dataclass(frozen=True)
class BackboneFamily:
    """A hand-written cut of one timm model class into blocks (a ``BACKBONE_FAMILIES`` entry).

    ``timm_class`` (``"module:Class"``) is matched exactly: a subclass (e.g. a distilled ViT) may change the
    forward, so it goes to the generic rule rather than being cut wrongly. ``cut(model)`` returns the blocks,
    their names and the head; ``small_stem(model)`` adapts the stem to small images (None: the family has
    none). A plugin adds a family through the entry-point group ``exitbench.backbone_families``."""

    name: str
    timm_class: str
    cut: Callable[[nn.Module], Cut]
    small_stem: Callable[[nn.Module], None] | None = None
    generic: bool = False  # cut by benchmarks.generic_cut's rule, not by a hand adapter


BACKBONE_FAMILIES: Registry[BackboneFamily] = Registry("backbone family", base=BackboneFamily,
                                                       group="exitbench.backbone_families", field="backbone")
for _fam, _help in (
    (BackboneFamily("resnet", "timm.models.resnet:ResNet", _cut_resnet, _small_stem_resnet),
     "a block per residual block of layer1..4 (layer2.1)"),
    (BackboneFamily("densenet", "timm.models.densenet:DenseNet", _cut_densenet, _small_stem_densenet),
     "a block per dense layer (denseblock2.layer5)"),
    (BackboneFamily("vgg", "timm.models.vgg:VGG", _cut_vgg, _no_change), "a block per conv group ending in a "
     "max-pool (stage3)"),
    (BackboneFamily("efficientnet", "timm.models.efficientnet:EfficientNet", _cut_efficientnet,
                    _small_stem_conv_stem), "a block per block inside `blocks` (blocks.3.1)"),
    (BackboneFamily("mobilenetv3", "timm.models.mobilenetv3:MobileNetV3", _cut_mobilenetv3, _small_stem_conv_stem),
     "a block per block inside `blocks` (blocks.3.1)"),
    (BackboneFamily("vit", "timm.models.vision_transformer:VisionTransformer", _cut_vit, _no_change),  # small
     "a block per transformer block (blocks.7); small images: img_size and patch 4 at creation"),  # stem: kwargs
):
    BACKBONE_FAMILIES.register(_fam.name, _fam, help=_help)


def _family_of(model: nn.Module, name: str) -> BackboneFamily:
    """The registered family of the model's exact timm class, else the generic rule (``generic_cut``) named
    after the model's timm module (``convnext``, ``swin_transformer``, ...)."""
    for fam_name in BACKBONE_FAMILIES.names():
        fam = BACKBONE_FAMILIES.get(fam_name)
        module, _, cls = fam.timm_class.partition(":")
        if type(model).__module__ == module and type(model).__qualname__ == cls:
            return fam
    if not type(model).__module__.startswith("timm."):
        raise UserError(f"backbone: {name!r} is a {type(model).__name__}, not a timm model; exitbench cuts timm "
                        "classifiers")
    module = type(model).__module__.rsplit(".", 1)[-1]
    return BackboneFamily(module, f"{type(model).__module__}:{type(model).__qualname__}",
                          lambda m: cut_generic(m, name), generic=True)


# ----------------------------------------------------------------------------------------------
# Building


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def resolve_small_stem(input_size: tuple[int, int, int], small_stem: bool | None) -> bool:
    """``small_stem`` as given, or (when None) on for inputs of 64 px or less."""
    return bool(small_stem) if small_stem is not None else max(input_size[1:]) <= SMALL_INPUT_MAX_SIDE


def _check_args(name: str, num_classes: int, input_size: Any) -> tuple[int, int, int]:
    from exitbench.benchmarks.models import timm  # timm, with exitbench's models registered

    if not timm.is_model(name):
        raise UserError(f"backbone: unknown timm model {name!r}; {did_you_mean(name, timm.list_models())}")
    arch, tag = timm.models.split_model_name_tag(name)
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise UserError(f"backbone: timm has no weights tag {tag!r} for {arch}; "
                        f"{did_you_mean(name, timm.list_pretrained(f'{arch}.*') or [arch])}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes: must be an integer of at least 1, got {num_classes!r}")
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"input_size: expected (channels, height, width), got {input_size!r}")
    return size  # type: ignore[return-value]


def create_timm_model(name: str, num_classes: int, input_size: tuple[int, int, int] = (3, 32, 32),
                      small_stem: bool | None = None, pretrained: bool = False, **timm_kwargs: Any) -> nn.Module:
    """The timm model ``name`` adapted to the dataset (classes, input size, small-image stem), uncut.

    With ``pretrained`` and a small stem, a 7x7 stem conv is replaced by a freshly initialised 3x3
    one (the rest keeps its pretrained weights); a 3x3 stem keeps its weights at stride 1.
    """
    from exitbench.benchmarks.models import timm  # timm, with exitbench's models registered

    size = _check_args(name, num_classes, input_size)
    small = resolve_small_stem(size, small_stem)
    # timm's ViT has a fixed patch grid: it must be told the input size (and the small stem's patch)
    vit_kwargs = {"img_size": size[1:], **({"patch_size": VIT_SMALL_PATCH} if small else {})}
    base = {"num_classes": int(num_classes), "in_chans": size[0]}

    def create(extra: dict[str, Any]) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, **{**base, **extra, **timm_kwargs})
        except OSError as e:
            if not pretrained:
                raise
            raise UserError(f"backbone {name}: pretrained weights could not be downloaded ({_first_line(e)}); "
                            f"give a local file with `weights: PATH` {_WEIGHTS_HINT}") from e
        except RuntimeError as e:
            if not pretrained:
                raise
            raise UserError(f"backbone {name}: pretrained weights could not be loaded ({_first_line(e)}); "
                            f"give a local file with `weights: PATH` {_WEIGHTS_HINT}") from e

    is_vit = timm.models.is_model_in_modules(timm.models.get_arch_name(name), _VIT_MODULES)
    model = create(vit_kwargs if is_vit else {})
    if not is_vit and _family_of(model, name).name == "vit":  # a ViT registered in another timm module
        model = create(vit_kwargs)
    fam = _family_of(model, name)
    if fam.generic and _takes_img_size(model) and tuple(size[1:]) != _default_size(model):
        # Swin, LeViT, EfficientViT: grids and biases sized at creation (an int where square: some take only that)
        model = create({"img_size": size[1] if size[1] == size[2] else size[1:]})
    if fam.small_stem is None:
        if small_stem:
            raise UserError(f"backbone {name}: small_stem is not available for timm's {type(model).__name__} "
                            f"(cut by the generic rule, stem left as timm builds it); set small_stem: false")
        small = False
    elif small:
        fam.small_stem(model)
    model.exitbench_small_stem = small  # read by stage_model
    return model


def _takes_img_size(model: nn.Module) -> bool:
    import inspect

    return any("img_size" in inspect.signature(c.__init__).parameters  # LevitDistilled(*args) passes it on
               for c in type(model).__mro__ if issubclass(c, nn.Module) and c is not nn.Module)


def _default_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[1:])


def stage_model(model: nn.Module, *, name: str = "", num_classes: int | None = None,
                input_size: tuple[int, int, int] = (3, 32, 32)) -> StagedBackbone:
    """Cut a timm ``model`` (as made by :func:`create_timm_model`) into a measured StagedBackbone.

    The blocks share the model's modules and parameters, so the model's own forward still works (the
    tests compare the two). Fills ``block_macs``, ``head_macs``, ``macs`` (ptflops-aten, batch 1) and
    ``candidates`` in one batch-1 forward.
    """
    fam = _family_of(model, name or type(model).__name__)
    blocks, names, head = fam.cut(model)
    backbone = StagedBackbone(blocks, names, head, name=name, num_classes=int(num_classes or model.num_classes),
                              input_size=tuple(input_size))
    backbone.family = fam.name
    backbone.cut_rule = "generic" if fam.generic else "adapter"
    backbone.small_stem = bool(getattr(model, "exitbench_small_stem", False))
    backbone.prefix_tokens = int(model.num_prefix_tokens) if fam.name == "vit" else 0
    # Swin and MambaOut hand (H, W, C) maps from block to block (timm's output_fmt says so)
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    shapes = flops.measure_blocks(backbone)
    cumulative = 0
    for i, (block_name, shape) in enumerate(zip(names[:-1], shapes[:-1])):
        cumulative += backbone.block_macs[i]
        last = len(shape) == 2 or (channels_last and len(shape) == 3)  # (tokens, C), (H, W, C) or (C, H, W)
        backbone.candidates.append(ExitPoint(index=i, name=block_name, channels=int(shape[-1] if last else shape[0]),
                                             feature_shape=shape, macs_cumulative=cumulative,
                                             prefix_tokens=backbone.prefix_tokens,
                                             channels_last=channels_last and len(shape) == 3))
    return backbone


def create_backbone(name: str, num_classes: int, input_size: tuple[int, int, int] = (3, 32, 32),
                    small_stem: bool | None = None, pretrained: bool = False, weights: str | os.PathLike | None = None,
                    **timm_kwargs: Any) -> StagedBackbone:
    """A timm classifier by ``name``, adapted to the dataset and cut into a measured StagedBackbone.

    ``small_stem=None`` turns the small-image stem on for inputs of 64 px or less. Weights: random
    init by default; ``pretrained=True`` downloads timm's weights; ``weights=PATH`` loads a local
    ``.safetensors`` / ``.pth`` / ``.pt`` file holding the timm model's state_dict (raw, or under
    "state_dict" / "model"), or a file written by :func:`save_weights`. Pretrained weights with a
    small stem: see :func:`create_timm_model`. Extra keyword arguments go to ``timm.create_model``
    (e.g. ``drop_rate``, ``drop_path_rate``).
    """
    if pretrained and weights is not None:
        raise UserError("backbone: give either `pretrained: true` or `weights: PATH`, not both")
    if str(weights) == "train":
        raise UserError("weights: 'train' is resolved by the harness (it trains, then caches with save_weights); "
                        "create_backbone takes None or a file path")
    size = _check_args(name, num_classes, input_size)
    state = _read_state_dict(weights)[0] if weights is not None else None  # before building: fail fast
    model = create_timm_model(name, num_classes, size, small_stem, pretrained, **timm_kwargs)
    small = model.exitbench_small_stem
    backbone = stage_model(model, name=name, num_classes=num_classes, input_size=size)
    if state is not None:
        # A file written by save_weights has the staged keys (blocks.0.stem...), any other the timm keys.
        target = backbone if set(state) == set(backbone.state_dict()) else model
        what = f"{name} ({num_classes} classes, {'small' if small else 'standard'} stem, input {size})"
        _load_checked(target, state, weights, what)
    return backbone


# ----------------------------------------------------------------------------------------------
# Weights files


def _read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A state_dict (on CPU) and its metadata from a .safetensors file or a weights-only .pth/.pt file."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights: file {str(p)!r} not found; give the path of a .safetensors or .pth file "
                        f"{_WEIGHTS_HINT}")
    suffix = p.suffix.lower()
    meta: dict[str, str] = {}
    try:
        if suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                state: Any = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"weights: {str(p)!r} has an unknown suffix {suffix!r}; use .safetensors, .pth or .pt")
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refuses pickled objects and junk
        raise UserError(f"weights: {str(p)!r} is not a weights-only checkpoint (it holds Python objects or is not a "
                        f"torch file); save it with torch.save(model.state_dict(), path) or safetensors") from e
    except (OSError, RuntimeError, SafetensorError) as e:
        raise UserError(f"weights: cannot read {str(p)!r} ({_first_line(e)}); save it with safetensors or "
                        f"torch.save(model.state_dict(), path)") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"weights: {str(p)!r} holds no state_dict of tensors (raw, or under 'state_dict' or 'model')")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta


def check_weights_file(path: str | os.PathLike, where: str) -> None:
    """Refuse, when a matrix is read, a weights file that is missing or cannot be read as a state_dict
    (a one-line UserError naming ``where``); whether its keys fit the backbone is checked when it is built."""
    try:
        _read_state_dict(path)
    except UserError as e:
        raise UserError(f"{where}: {str(e).removeprefix('weights: ')}") from None


def _load_checked(module: nn.Module, state: dict[str, Tensor], path: Any, what: str) -> None:
    """``module.load_state_dict(state)`` with a one-line UserError that says what does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k!r}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} here)")
        raise UserError(f"weights: {str(path)!r} does not fit {what}: {', '.join(parts)}; save the weights from the "
                        f"same timm model with the same num_classes, input size and small_stem, {_WEIGHTS_HINT}")
    module.load_state_dict(state, strict=True)


def save_weights(backbone: StagedBackbone, path: str | os.PathLike) -> None:
    """Write the staged backbone's state_dict to ``path`` (safetensors; atomic replace).

    The metadata records the timm name, classes, input size and stem, checked by :func:`load_weights`.
    """
    from safetensors.torch import save_file

    p = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    meta = {"format": "exitbench.staged_backbone", "name": backbone.name, "num_classes": str(backbone.num_classes),
            "input_size": "x".join(map(str, backbone.input_size)),
            "small_stem": str(bool(getattr(backbone, "small_stem", False))).lower()}
    # readers (other cells using the cache) never see a half-written file
    write_atomic(p, lambda tmp: save_file(state, str(tmp), metadata=meta))


def load_weights(backbone: StagedBackbone, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save_weights` (or any state_dict with the staged keys) in place."""
    state, meta = _read_state_dict(path)
    if meta.get("name") and backbone.name and meta["name"] != backbone.name:
        raise UserError(f"weights: {str(path)!r} holds a {meta['name']} backbone, not {backbone.name}; "
                        f"delete the file or point to the right one")
    what = f"{backbone.name or 'the backbone'} ({backbone.num_classes} classes, input {backbone.input_size})"
    _load_checked(backbone, state, path, what)

__all__ = ["BACKBONE_FAMILIES", "BackboneFamily", "TESTED_BACKBONES", "create_backbone", "create_timm_model",
           "load_weights", "resolve_small_stem", "save_weights", "stage_model"]
