"""CIFAR-10 ResNets and plain nets of He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2.

A 3x3 stem conv with 16 filters, then three stages of ``n`` blocks of two 3x3 convs on 32x32, 16x16 and
8x8 maps with 16, 32 and 64 filters, global average pooling and a 10-way fc: 6n+2 weighted layers.
Shortcuts are option A (parameter-free) by default as in the paper; ``shortcut="B"`` uses projections and
``shortcut="plain"`` (the ``plain*`` builders) removes them. Parameter counts (10 classes, option A)
match Table 6: resnet20 0.27M, resnet32 0.46M, resnet44 0.66M, resnet56 0.85M, resnet110 1.7M,
resnet1202 19.4M.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .base import ClassifierNet
from .blocks import BasicBlock, ResidualBlock, conv3x3, drop_path_rates, init_weights, make_stage
from .registry import register_model
from .resnet import set_inner_channels

_PAPER = "He et al. 2016, §4.2 / Table 6"


class CifarResNet(ClassifierNet):
    """The 6n+2-layer CIFAR network of He et al. 2016, §4.2 (three stages, widths 16/32/64 x ``width``).

    ``inner_channels`` (optional) narrows the inside of each block, see ``resnet.set_inner_channels``.
    """

    def __init__(self, block: type[ResidualBlock], depths: Sequence[int], *, num_classes: int = 10,
                 in_chans: int = 3, shortcut: str = "A", width: float = 1.0, drop_path_rate: float = 0.0,
                 zero_init_residual: bool = False, inner_channels: Sequence[Sequence[int]] | None = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        widths = [int(round(c * width)) for c in (16, 32, 64)]
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        rates = drop_path_rates(drop_path_rate, depths)
        channels, reduction, self.stage_info = widths[0], 1, []
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            name = f"layer{i + 1}"
            stage, info = make_stage(name, block, channels, planes, depth, stride=1 if i == 0 else 2,
                                     in_reduction=reduction, shortcut=shortcut, drop_path_rates=rates[i])
            self.add_module(name, stage)
            self.stage_info.append(info)
            channels, reduction = info.channels, info.reduction
        self.num_features = channels
        if inner_channels is not None:  # a channel-pruned net (reslab prune): narrower block interiors
            set_inner_channels([b for info in self.stage_info for b in getattr(self, info.name)], inner_channels)

        init_weights(self, zero_init_residual)
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)


def _cifar(n: int, num_classes: int, in_chans: int, **kwargs) -> CifarResNet:
    return CifarResNet(BasicBlock, [n, n, n], num_classes=num_classes, in_chans=in_chans, **kwargs)


def _plain(n: int, num_classes: int, in_chans: int, **kwargs) -> CifarResNet:
    if kwargs.pop("shortcut", "plain") != "plain":
        raise ValueError("plain nets have no shortcuts; use the resnet* builders for options A/B/C")
    return _cifar(n, num_classes, in_chans, shortcut="plain", **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet20(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-20 (n=3): 0.27M params, 8.75% CIFAR-10 error in Table 6."""
    return _cifar(3, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet32(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-32 (n=5): 0.46M params, 7.51% error."""
    return _cifar(5, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet44(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-44 (n=7): 0.66M params, 7.17% error."""
    return _cifar(7, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet56(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-56 (n=9): 0.85M params, 6.97% error."""
    return _cifar(9, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet110(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-110 (n=18): 1.7M params, 6.43% error (best of 5 runs; 6.61±0.16 mean)."""
    return _cifar(18, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnet"))
def resnet1202(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """ResNet-1202 (n=200): 19.4M params, 7.93% error (overfits, §4.2)."""
    return _cifar(200, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "plain"))
def plain20(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Plain-20 (n=3, no shortcuts), the baseline of Fig. 6 left."""
    return _plain(3, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "plain"))
def plain32(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Plain-32 (n=5, no shortcuts)."""
    return _plain(5, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "plain"))
def plain44(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Plain-44 (n=7, no shortcuts)."""
    return _plain(7, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "plain"))
def plain56(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Plain-56 (n=9, no shortcuts): higher training error than plain-20, the degradation problem (Fig. 6)."""
    return _plain(9, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "plain"))
def plain110(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarResNet:
    """Plain-110 (n=18, no shortcuts): error above 60% per the caption of Fig. 6."""
    return _plain(18, num_classes, in_chans, **kwargs)
