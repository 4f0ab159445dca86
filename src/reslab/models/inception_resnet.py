"""Inception-ResNet-v2 of Szegedy et al. 2016, "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning" (AAAI 2017).

Residual Inception blocks (Figs. 16-18: Inception-ResNet-A/B/C on 35x35, 17x17 and 8x8 maps) join the
shortcut after a 1x1 "filter-expansion" conv that restores the stream's width, between reduction blocks
(Fig. 7 with k, l, m, n = 256, 256, 384, 384 for A; Fig. 18 for B). §3.3 / Fig. 20: when filters exceed
~1000 the residual variants die early in training unless the residual branch is scaled down by 0.1-0.3
before the sum; ``residual_scale`` sets it (one float, or one per stage; default 0.17/0.10/0.20, the
values of the reference TF-slim code). Every block of a stage is scaled; the last block of stage 3 has no
ReLU after its sum (TF-slim), since a BN-ReLU 1x1 conv follows.

As in common implementations (TF-slim, timm; 55.8M parameters at 1000 classes), the stem is the
Inception-v3 stem plus a 35x35 Inception block ("mixed_5b") rather than the Fig. 3 stem, and the stages
hold 10 x A, 20 x B, 10 x C blocks (Fig. 15 draws 5/10/5; the released v2 model has 10/20/10).
Convolutions marked 'V' in the paper's figures use no padding: a 299x299 input ends as 8x8 (not 299/32).

``inception_resnet_cifar`` keeps the blocks at a quarter of the width with 'same' padding and no early
downsampling (32x32 -> 32/16/8 maps), with 3/6/3 blocks: a small CIFAR-size residual Inception net.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Sequence, Union

import torch
import torch.nn as nn

from .base import StageInfo
from .blocks import ConvNormAct, DropPath, ResidualBlock, StagedNet, drop_path_rates, init_weights
from .registry import register_model

# A branch is a list of convs (out_channels, kernel, stride, 'valid'?) or a pooling step ("max"/"avg").
# The numbers are the filter counts of Figs. 16-18 and the reduction blocks of TF-slim's implementation.
ConvSpec = tuple
BLOCK_A = [[(32, 1)], [(32, 1), (32, 3)], [(32, 1), (48, 3), (64, 3)]]  # Fig. 16, on 35x35
BLOCK_B = [[(192, 1)], [(128, 1), (160, (1, 7)), (192, (7, 1))]]  # Fig. 17, on 17x17
BLOCK_C = [[(192, 1)], [(192, 1), (224, (1, 3)), (256, (3, 1))]]  # Fig. 19, on 8x8
STEM_MIXED = [[(96, 1)], [(48, 1), (64, 5)], [(64, 1), (96, 3), (96, 3)], ["avg", (64, 1)]]  # 35x35, 320 out
REDUCTION_A = [[(384, 3, 2, True)], [(256, 1), (256, 3), (384, 3, 2, True)], ["max"]]  # Fig. 7, 35 -> 17
REDUCTION_B = [[(256, 1), (384, 3, 2, True)], [(256, 1), (288, 3, 2, True)],
               [(256, 1), (288, 3), (320, 3, 2, True)], ["max"]]  # Fig. 18, 17 -> 8
_BN = partial(nn.BatchNorm2d, eps=1e-3)  # TF-slim's epsilon


class BranchConcat(nn.Module):
    """Parallel branches on the same input, concatenated along channels (the Inception module)."""

    def __init__(self, branches: Sequence[nn.Module], out_channels: int):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def make_branches(in_channels: int, spec: list, width: float, valid: bool) -> BranchConcat:
    """Build ``BranchConcat`` from a spec; ``width`` scales every conv, ``valid`` honours the 'V' marks."""
    branches, out_channels = [], 0
    for branch_spec in spec:
        layers, channels = [], in_channels
        for step in branch_spec:
            if step == "max":  # the stride-2 pooling branch of the reduction blocks
                layers.append(nn.MaxPool2d(3, stride=2, padding=0 if valid else 1))
                continue
            if step == "avg":
                layers.append(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False))
                continue
            filters, kernel, stride, is_valid = (tuple(step) + (1, False))[:4]
            out = max(8, int(filters * width))
            layers.append(ConvNormAct(channels, out, kernel, stride, padding=0 if (valid and is_valid) else None,
                                      norm_layer=_BN))
            channels = out
        branches.append(nn.Sequential(*layers))
        out_channels += channels
    return BranchConcat(branches, out_channels)


class InceptionResidual(ResidualBlock):
    """Inception-ResNet block (Figs. 16/17/19): branches, 1x1 linear expansion back to the stream width
    (with bias, no BN, as in TF-slim), scaled sum with the identity (§3.3), then ReLU."""

    def __init__(self, channels: int, spec: list, *, width: float = 1.0, residual_scale: float = 1.0,
                 activate: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        self.branches = make_branches(channels, spec, width, valid=False)
        self.up = nn.Conv2d(self.branches.out_channels, channels, 1, bias=True)
        self.residual_scale = residual_scale
        self.relu = nn.ReLU(inplace=True) if activate else nn.Identity()
        self.use_shortcut = True
        self.downsample = None
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.merge(self.up(self.branches(x)), x))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"residual_scale={self.residual_scale}"


Scale = Union[float, Sequence[float]]


def inception_resnet(*, num_classes: int, in_chans: int, depths: Sequence[int] = (10, 20, 10), width: float = 1.0,
                     residual_scale: Scale = (0.17, 0.10, 0.20), drop_path_rate: float = 0.0, cifar: bool = False,
                     zero_init_residual: bool = False) -> StagedNet:
    """Inception-ResNet-v2 body: stem, stage A (35x35), reduction + stage B (17x17), reduction + stage C (8x8)
    closed by a 1x1 conv to 1536 (x width) features."""
    scales = [float(residual_scale)] * 3 if isinstance(residual_scale, (int, float)) else list(residual_scale)
    if len(scales) != 3 or not all(s > 0 for s in scales):
        raise ValueError(f"residual_scale must be a positive float or three of them, got {residual_scale!r}")
    if len(depths) != 3 or min(depths) < 1:
        raise ValueError(f"depths must be three positive block counts, got {depths!r}")

    def conv(cin: int, filters: int, kernel: int, stride: int = 1, padding: int | None = None) -> ConvNormAct:
        return ConvNormAct(cin, max(8, int(filters * width)), kernel, stride, padding=padding, norm_layer=_BN)

    valid = not cifar
    if cifar:  # 32x32 stays 32x32 until the reductions
        stem_layers = [("conv2d_1a", conv(in_chans, 32, 3)), ("conv2d_2b", conv(max(8, int(32 * width)), 64, 3))]
        channels, reduction = max(8, int(64 * width)), 1
    else:  # Fig. 9 'V' convs: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35
        c32, c64, c80, c192 = (max(8, int(c * width)) for c in (32, 64, 80, 192))
        stem_layers = [("conv2d_1a", conv(in_chans, 32, 3, 2, 0)), ("conv2d_2a", conv(c32, 32, 3, 1, 0)),
                       ("conv2d_2b", conv(c32, 64, 3)), ("maxpool_3a", nn.MaxPool2d(3, stride=2)),
                       ("conv2d_3b", conv(c64, 80, 1)), ("conv2d_4a", conv(c80, 192, 3, 1, 0)),
                       ("maxpool_5a", nn.MaxPool2d(3, stride=2))]
        channels, reduction = c192, 8
    mixed = make_branches(channels, STEM_MIXED, width, valid)
    stem_layers.append(("mixed_5b", mixed))
    channels = mixed.out_channels

    rates = drop_path_rates(drop_path_rate, depths)
    stages = []
    for i, (spec, reduce_spec) in enumerate([(BLOCK_A, None), (BLOCK_B, REDUCTION_A), (BLOCK_C, REDUCTION_B)]):
        layers: list[nn.Module] = []
        if reduce_spec is not None:
            reduce = make_branches(channels, reduce_spec, width, valid)
            layers.append(reduce)
            channels, reduction = reduce.out_channels, reduction * 2
        last_stage = i == 2
        for j, rate in enumerate(rates[i]):
            layers.append(InceptionResidual(channels, spec, width=width, residual_scale=scales[i],
                                            activate=not (last_stage and j == depths[i] - 1), drop_path_rate=rate))
        if last_stage:
            layers.append(conv(channels, 1536, 1))  # conv2d_7b
            channels = layers[-1].out_channels
        stages.append((nn.Sequential(*layers), StageInfo(f"layer{i + 1}", channels, reduction)))

    model = StagedNet(nn.Sequential(OrderedDict(stem_layers)), stages, num_classes=num_classes)
    init_weights(model, zero_init_residual)
    return model


@register_model(paper="Szegedy et al. 2016, Figs. 15-19", input_size=(3, 299, 299), num_classes=1000,
                tags=("imagenet", "inception"))
def inception_resnet_v2(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> StagedNet:
    """Inception-ResNet-v2: 55.8M params at 1000 classes, as the TF-slim/timm implementations."""
    return inception_resnet(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper="Szegedy et al. 2016 (CIFAR-size variant)", input_size=(3, 32, 32), num_classes=10,
                tags=("cifar", "inception"))
def inception_resnet_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Quarter-width Inception-ResNet-v2 blocks, 3/6/3 per stage, for 32x32 inputs (not in the paper)."""
    kwargs.setdefault("depths", (3, 6, 3))
    kwargs.setdefault("width", 0.25)
    return inception_resnet(num_classes=num_classes, in_chans=in_chans, cifar=True, **kwargs)
