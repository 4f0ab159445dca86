"""Residual building blocks and the one stage builder shared by every ResNet family.

Read top-down in build order: conv helpers, stochastic depth (``DropPath``), shortcuts (options A/B/C of
He et al. 2016 §3.3 and "plain"), ``BasicBlock`` and ``Bottleneck`` (He et al. 2016, Fig. 5), then
``make_stage``. Attribute names follow torchvision (conv1, bn1, conv2, bn2, conv3, bn3, downsample, relu)
so torchvision state_dicts load with no key mapping.

Extension points for later blocks (pre-activation v2, MobileNetV2 inverted residuals, Inception-ResNet
with residual scaling) are ``ResidualBlock.merge`` (where the branch meets the shortcut) and
``make_stage``, which accepts any block class with the same constructor shape.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import StageInfo

NormLayer = Callable[[int], nn.Module]
SHORTCUT_KINDS = ("A", "B", "C", "plain")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with 'same' padding; no bias because a BatchNorm always follows."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, groups=groups,
                     dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, used for bottleneck reduce/expand and projection shortcuts."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


# ---------------------------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth on a residual branch (Huang et al. 2016, "Deep Networks with Stochastic Depth").

    In training, each sample's residual branch is dropped with probability ``p`` and the kept ones are
    scaled by 1 / (1 - p). The paper instead drops per mini-batch and scales by the survival probability
    at test time (its Eq. 5); per-sample dropping with inverse scaling has the same expectation and leaves
    evaluation untouched. ``p == 0`` or eval mode returns the input itself (exactly identity).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-block drop rates with the linear decay rule of Huang et al. 2016 (§3): rate_l = rate * l / L.

    ``l`` counts blocks from 1 over the whole network and ``L = sum(depths)``, so the first block is
    almost never dropped and the last one is dropped with probability ``rate``. Returns one list per stage.
    """
    total = sum(depths)
    rates, first = [], 1
    for depth in depths:
        rates.append([rate * l / total for l in range(first, first + depth)])
        first += depth
    return rates


# ---------------------------------------------------------------------------------------------------------
# Shortcuts
# ---------------------------------------------------------------------------------------------------------
class PadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016, §3.3 and §4.2): identity with stride-``stride`` subsampling and
    zero entries appended for the extra channels. Parameter-free, which is why the CIFAR nets of Table 6
    have exactly as many parameters as their plain counterparts."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option A cannot reduce channels; use a projection (option B)")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int,
                  norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module | None:
    """The shortcut path of one block, ``None`` meaning plain identity (or no shortcut at all for "plain").

    He et al. 2016, §3.3 / Table 3: (A) zero-padding identity when shapes change, (B) 1x1 projection + BN
    only when shapes change (torchvision's choice), (C) projection on every block.
    """
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_KINDS}, got {kind!r}")
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "plain" or (kind in ("A", "B") and not shape_changes):
        return None
    if kind == "A":
        return PadShortcut(in_channels, out_channels, stride)
    # Sequential(conv, bn) gives torchvision's keys downsample.0.* / downsample.1.*
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """Shared plumbing: where the residual branch meets the shortcut.

    ``use_shortcut=False`` gives the "plain" block of He et al. 2016 §4.1 (the stacked layers alone).
    Subclasses set ``self.drop_path`` and ``self.downsample`` and call ``merge`` after their branch.
    """

    expansion: int = 1
    use_shortcut: bool
    downsample: nn.Module | None
    drop_path: DropPath

    def merge(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.use_shortcut:
            return branch
        identity = x if self.downsample is None else self.downsample(x)
        return identity + self.drop_path(branch)

    def last_norm(self) -> nn.Module:  # pragma: no cover - abstract
        """The BN closing the residual branch, zeroed by ``zero_init_residual`` (Goyal et al. 2017, §5.1)."""
        raise NotImplementedError

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.last_norm().weight)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (He et al. 2016, Fig. 5 left): ResNet-18/34 and all CIFAR nets of §4.2."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, groups: int = 1, base_width: int = 64, use_shortcut: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        if downsample is not None and not use_shortcut:
            raise ValueError("a plain block (use_shortcut=False) has no downsample path")
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.use_shortcut = use_shortcut
        self.drop_path = DropPath(drop_path_rate)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.merge(out, x))

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (He et al. 2016, Fig. 5 right): ResNet-50/101/152.

    As torchvision's "V1.5", the stride sits on the 3x3 conv, not the first 1x1 as in the paper; this is
    slightly more accurate (~0.5% top-1) and is what torchvision's weights expect. ``groups`` and
    ``base_width`` give ResNeXt (Xie et al. 2017) and wide ResNets (Zagoruyko & Komodakis 2016).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, groups: int = 1, base_width: int = 64, use_shortcut: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if downsample is not None and not use_shortcut:
            raise ValueError("a plain block (use_shortcut=False) has no downsample path")
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.use_shortcut = use_shortcut
        self.drop_path = DropPath(drop_path_rate)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.merge(out, x))

    def last_norm(self) -> nn.Module:
        return self.bn3


# ---------------------------------------------------------------------------------------------------------
# Stage builder
# ---------------------------------------------------------------------------------------------------------
def make_stage(name: str, block: type[ResidualBlock], in_channels: int, planes: int, num_blocks: int, *,
               stride: int, in_reduction: int, shortcut: str = "B",
               drop_path_rates: Sequence[float] | None = None, **block_kwargs) -> tuple[nn.Sequential, StageInfo]:
    """Build one stage: ``num_blocks`` blocks, the first one changing stride/width. Pure: no state is kept.

    ``in_reduction`` is the cumulative stride of the stage's input, so the returned ``StageInfo`` carries the
    stage's output reduction. ``drop_path_rates`` holds one rate per block (see ``drop_path_rates``).
    """
    if num_blocks < 1:
        raise ValueError(f"a stage needs at least one block, got {num_blocks}")
    rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * num_blocks
    if len(rates) != num_blocks:
        raise ValueError(f"{len(rates)} drop path rates for {num_blocks} blocks")
    norm_layer = block_kwargs.get("norm_layer", nn.BatchNorm2d)
    out_channels = planes * block.expansion
    blocks, channels = [], in_channels
    for i, rate in enumerate(rates):
        block_stride = stride if i == 0 else 1
        downsample = make_shortcut(shortcut, channels, out_channels, block_stride, norm_layer)
        blocks.append(block(channels, planes, block_stride, downsample, use_shortcut=shortcut != "plain",
                            drop_path_rate=rate, **block_kwargs))
        channels = out_channels
    return nn.Sequential(*blocks), StageInfo(name, out_channels, in_reduction * stride)


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He init (He et al. 2015, "Delving Deep into Rectifiers"; kaiming_normal, fan_out, ReLU), BN to identity.

    ``zero_init_residual`` zeroes the last BN gamma of each block so every residual block starts as the
    identity (Goyal et al. 2017, §5.1); it needs shortcuts, otherwise the network would output a constant.
    The classifier is left to ``reset_classifier``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        if any(not b.use_shortcut for b in blocks):
            raise ValueError("zero_init_residual needs shortcuts; a plain net would output a constant")
        for b in blocks:
            b.zero_init_last()
