"""ImageNet ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1.

A 7x7/2 stem conv and 3x3/2 max pool, four stages at strides 4/8/16/32 with 64/128/256/512 planes,
global average pooling and a 1000-way fc. Shortcuts are option B (projection only when shapes change) and
bottlenecks put their stride on the 3x3 conv ("V1.5"), both as torchvision, whose state_dict keys these
models share exactly: a torchvision ResNet's weights load with ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .base import ClassifierNet
from .blocks import (BasicBlock, Bottleneck, ResidualBlock, conv1x1, conv3x3, drop_path_rates, init_weights,
                     make_stage)
from .registry import register_model

_PAPER = "He et al. 2016, Table 1"


def set_inner_channels(blocks: Sequence[nn.Module], inner_channels: Sequence[Sequence[int]]) -> None:
    """Give each residual block narrower inner convolutions: the architecture of a channel-pruned net.

    ``inner_channels`` holds one entry per block, in order (``layer1.0``, ``layer1.1``, ...): ``[c1]`` for a
    ``BasicBlock`` (conv1's outputs = conv2's inputs), ``[c1, c2]`` for a ``Bottleneck`` (conv1's and
    conv2's outputs). Block inputs and outputs, hence the residual stream and every shortcut, keep their
    width, so the additions stay consistent. Written by ``reslab prune``; new modules are fresh (call before
    ``init_weights``), weights are loaded afterwards from the pruned checkpoint.
    """
    blocks = list(blocks)
    if len(inner_channels) != len(blocks):
        raise ValueError(f"inner_channels has {len(inner_channels)} entries for {len(blocks)} residual blocks")
    for index, (block, widths) in enumerate(zip(blocks, inner_channels)):
        widths = [int(w) for w in widths]
        expected = {BasicBlock: 1, Bottleneck: 2}.get(type(block))
        if expected is None:
            raise ValueError(f"inner_channels supports BasicBlock and Bottleneck, not {type(block).__name__}")
        if len(widths) != expected or min(widths) < 1:
            raise ValueError(f"inner_channels[{index}] = {widths}: a {type(block).__name__} needs {expected} "
                             "positive width(s)")
        norm = type(block.bn1)
        if type(block) is BasicBlock:
            (c1,) = widths
            block.conv1 = conv3x3(block.conv1.in_channels, c1, block.conv1.stride[0])
            block.bn1 = norm(c1)
            block.conv2 = conv3x3(c1, block.conv2.out_channels)
        else:
            if block.conv2.groups != 1:
                raise ValueError("inner_channels does not support grouped bottlenecks (ResNeXt)")
            c1, c2 = widths
            block.conv1 = conv1x1(block.conv1.in_channels, c1)
            block.bn1 = norm(c1)
            block.conv2 = conv3x3(c1, c2, block.conv2.stride[0])
            block.bn2 = norm(c2)
            block.conv3 = conv1x1(c2, block.conv3.out_channels)


class ResNet(ClassifierNet):
    """ImageNet ResNet (He et al. 2016, Table 1); ``groups``/``width_per_group`` leave room for ResNeXt.

    ``inner_channels`` (optional) narrows the inside of each block, see ``set_inner_channels``.
    """

    def __init__(self, block: type[ResidualBlock], depths: Sequence[int], *, num_classes: int = 1000,
                 in_chans: int = 3, shortcut: str = "B", groups: int = 1, width_per_group: int = 64,
                 drop_path_rate: float = 0.0, zero_init_residual: bool = False,
                 inner_channels: Sequence[Sequence[int]] | None = None):
        super().__init__()
        stem_channels = 64
        self.conv1 = nn.Conv2d(in_chans, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        rates = drop_path_rates(drop_path_rate, depths)
        channels, reduction, self.stage_info = stem_channels, 4, []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            name = f"layer{i + 1}"
            stage, info = make_stage(name, block, channels, planes, depth, stride=1 if i == 0 else 2,
                                     in_reduction=reduction, shortcut=shortcut, drop_path_rates=rates[i],
                                     groups=groups, base_width=width_per_group)
            self.add_module(name, stage)
            self.stage_info.append(info)
            channels, reduction = info.channels, info.reduction
        self.num_features = channels
        if inner_channels is not None:  # a channel-pruned net (reslab prune): narrower block interiors
            set_inner_channels([b for info in self.stage_info for b in getattr(self, info.name)], inner_channels)

        init_weights(self, zero_init_residual)
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "resnet"))
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-18: 11.7M params, 1.8 GFLOPs (multiply-adds) in Table 1."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "resnet"))
def resnet34(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-34: 21.8M params, 3.6 GFLOPs."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "resnet"))
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-50: 25.6M params, 3.8 GFLOPs in the paper (4.1 G with the V1.5 stride placement)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "resnet"))
def resnet101(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-101: 44.5M params, 7.6 GFLOPs in the paper."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "resnet"))
def resnet152(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-152: 60.2M params, 11.3 GFLOPs in the paper."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, in_chans=in_chans, **kwargs)
