"""Residual building blocks and the one stage builder shared by every ResNet family.

Read top-down in build order: conv helpers, stochastic depth (``DropPath``), shortcuts (options A/B/C of
He et al. 2016 §3.3 and "plain"), ``BasicBlock`` and ``Bottleneck`` (He et al. 2016, Fig. 5), then
``make_stage``. Attribute names follow torchvision (conv1, bn1, conv2, bn2, conv3, bn3, downsample, relu)
so torchvision state_dicts load with no key mapping.

Later families extend the same plumbing: ``ResidualBlock.merge`` (where the branch meets the shortcut,
with an optional ``residual_scale``) is shared by the pre-activation blocks (He et al. 2016b, also the
wide ResNets), ``InvertedResidual`` (MobileNetV2) and the Inception-ResNet blocks; ``make_stage`` accepts
any block class with the BasicBlock constructor shape; ``ConvNormAct`` is the conv-BN-activation unit of
the non-ResNet families (same keys as torchvision's ``Conv2dNormActivation``); ``StagedNet`` is the one
network body (stem, stages, optional final BN-ReLU, head) that the new CIFAR/ImageNet families share.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ClassifierNet, StageInfo

NormLayer = Callable[[int], nn.Module]
SHORTCUT_KINDS = ("A", "B", "C", "plain")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with 'same' padding; no bias because a BatchNorm always follows."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, groups=groups,
                     dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, used for bottleneck reduce/expand and projection shortcuts."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BN -> activation, the unit of MobileNetV2, Inception and plain nets.

    A ``Sequential`` with children 0/1/2, so keys are ``*.0.weight`` / ``*.1.running_mean`` as in
    torchvision's ``Conv2dNormActivation``. ``padding=None`` keeps the spatial size ('same' for odd kernels);
    Inception's 'valid' convolutions pass ``padding=0``. ``activation=None`` leaves the output linear.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int = 1, *, groups: int = 1, padding: int | tuple[int, int] | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d, activation: Callable[..., nn.Module] | None = nn.ReLU):
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if padding is None:
            padding = tuple((k - 1) // 2 for k in kernel)
        layers = [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups,
                            bias=False), norm_layer(out_channels)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


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
                  norm_layer: NormLayer | None = nn.BatchNorm2d) -> nn.Module | None:
    """The shortcut path of one block, ``None`` meaning plain identity (or no shortcut at all for "plain").

    He et al. 2016, §3.3 / Table 3: (A) zero-padding identity when shapes change, (B) 1x1 projection + BN
    only when shapes change (torchvision's choice), (C) projection on every block. ``norm_layer=None``
    gives a bare 1x1 projection: pre-activation blocks feed it an input that is already normalised.
    """
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_KINDS}, got {kind!r}")
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "plain" or (kind in ("A", "B") and not shape_changes):
        return None
    if kind == "A":
        return PadShortcut(in_channels, out_channels, stride)
    # Sequential(conv, bn) gives torchvision's keys downsample.0.* / downsample.1.*
    if norm_layer is None:
        return nn.Sequential(conv1x1(in_channels, out_channels, stride))
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """Shared plumbing: where the residual branch meets the shortcut.

    ``use_shortcut=False`` gives the "plain" block of He et al. 2016 §4.1 (the stacked layers alone).
    Subclasses set ``self.drop_path`` and ``self.downsample`` and call ``merge`` after their branch.
    ``residual_scale`` multiplies the branch before the sum (Szegedy et al. 2016, §3.3 / Fig. 20: scaling by
    0.1-0.3 stabilises very wide residual Inception networks); 1.0 leaves the sum untouched.
    ``shortcut_norm = False`` tells ``make_stage`` to build projections without BN (pre-activation blocks).
    """

    expansion: int = 1
    residual_scale: float = 1.0
    shortcut_norm: bool = True
    use_shortcut: bool
    downsample: nn.Module | None
    drop_path: DropPath

    def merge(self, branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.use_shortcut:
            return branch
        identity = x if self.downsample is None else self.downsample(x)
        if self.residual_scale != 1.0:
            branch = branch * self.residual_scale
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


class PreActBasicBlock(ResidualBlock):
    """Pre-activation basic block (He et al. 2016b, "Identity Mappings in Deep Residual Networks", Fig. 4e):
    BN-ReLU-conv3x3, BN-ReLU-conv3x3, then the sum with no ReLU after it, so the shortcut path stays a
    clean identity from block to block (the paper's Eq. 4).

    A projection shortcut takes the pre-activated input (as in the paper's code, where the first BN-ReLU is
    shared by both paths when shapes change). ``dropout`` between the two convs is the wide-ResNet option
    (Zagoruyko & Komodakis 2016, §2.4: dropout 0.3 inside the block, not on the shortcut).
    """

    expansion = 1
    shortcut_norm = False

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, use_shortcut: bool = True, drop_path_rate: float = 0.0, dropout: float = 0.0,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if downsample is not None and not use_shortcut:
            raise ValueError("a plain block (use_shortcut=False) has no downsample path")
        self.bn1 = norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn2 = norm_layer(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.use_shortcut = use_shortcut
        self.drop_path = DropPath(drop_path_rate)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return self.merge(out, pre if self.downsample is not None else x)

    def zero_init_last(self) -> None:
        # the branch ends in a conv, not a BN: zeroing it makes the block start as the identity
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(ResidualBlock):
    """Pre-activation bottleneck (He et al. 2016b, Fig. 4e with the 1x1-3x3-1x1 branch of ResNet-164/1001):
    BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride here, as torchvision's V1.5), BN-ReLU-conv1x1 (x4 channels).
    ``groups``/``base_width`` as in ``Bottleneck``.
    """

    expansion = 4
    shortcut_norm = False

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, groups: int = 1, base_width: int = 64, use_shortcut: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if downsample is not None and not use_shortcut:
            raise ValueError("a plain block (use_shortcut=False) has no downsample path")
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.use_shortcut = use_shortcut
        self.drop_path = DropPath(drop_path_rate)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return self.merge(out, pre if self.downsample is not None else x)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


class InvertedResidual(ResidualBlock):
    """MobileNetV2 inverted residual with linear bottleneck (Sandler et al. 2018, Table 1 and Fig. 3b).

    1x1 expansion by ``expand_ratio`` (ReLU6), 3x3 depthwise (ReLU6, carries the stride), 1x1 linear
    projection (no activation: §3.2, a ReLU in the low-dimensional bottleneck destroys information).
    The shortcut joins the thin bottlenecks only where shapes agree (stride 1, same width). Keys match
    torchvision's ``InvertedResidual`` (``conv.0.0.weight`` ...).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: float, *,
                 drop_path_rate: float = 0.0, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, norm_layer=norm_layer, activation=nn.ReLU6))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm_layer=norm_layer, activation=nn.ReLU6),
                   conv1x1(hidden, out_channels), norm_layer(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.stride = stride
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.downsample = None
        self.drop_path = DropPath(drop_path_rate if self.use_shortcut else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.conv(x), x)

    def last_norm(self) -> nn.Module:
        return self.conv[-1]


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
    norm_layer = block_kwargs.get("norm_layer", nn.BatchNorm2d) if block.shortcut_norm else None
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


def dirac_init(model: nn.Module) -> int:
    """Identity ("Dirac") initialisation of every 3x3 conv: its first ``min(out, in)`` filters pass their
    input channel straight through, the rest keep their He init, so each layer starts close to the identity
    on the channels it carries over (airbench, Jordan 2024, §3.3: CIFAR-10 94 % in 18 epochs instead of 21).
    Returns the number of convs initialised."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (3, 3)]
    for m in convs:
        n = min(m.out_channels, m.in_channels)
        nn.init.dirac_(m.weight.data[:n])
    return len(convs)


# ---------------------------------------------------------------------------------------------------------
# Network body shared by the later families
# ---------------------------------------------------------------------------------------------------------
class StagedNet(ClassifierNet):
    """Stem -> stages (attributes named by their ``StageInfo``) -> optional final norm -> pool -> ``fc``.

    The families built on it (pre-activation and wide ResNets, CIFAR ResNeXt, Inception-ResNet, SimpleNet)
    differ only in the modules they pass in; the forward pass is this one. ``final_norm`` is the BN-ReLU
    that pre-activation networks need before pooling (He et al. 2016b, §4: the last block's sum is
    otherwise never normalised). Weights are initialised by the family builder (``init_weights``).
    """

    def __init__(self, stem: nn.Module, stages: Sequence[tuple[nn.Module, StageInfo]], *, num_classes: int,
                 final_norm: nn.Module | None = None):
        super().__init__()
        if not stages:
            raise ValueError("a StagedNet needs at least one stage")
        self.stem = stem
        self.stage_info = []
        for module, info in stages:
            self.add_module(info.name, module)
            self.stage_info.append(info)
        self.final_norm = final_norm if final_norm is not None else nn.Identity()
        self.num_features = self.stage_info[-1].channels
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for info in self.stage_info:
            x = getattr(self, info.name)(x)
        return self.final_norm(x)


def norm_act(channels: int, norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Sequential:
    """BN-ReLU without a conv: the final activation of pre-activation networks."""
    return nn.Sequential(norm_layer(channels), nn.ReLU(inplace=True))


def make_stages(block: type[ResidualBlock], in_channels: int, planes: Sequence[int], depths: Sequence[int],
                strides: Sequence[int], *, in_reduction: int, shortcut: str = "B", drop_path_rate: float = 0.0,
                **block_kwargs) -> list[tuple[nn.Sequential, StageInfo]]:
    """``make_stage`` over every stage (``layer1``, ``layer2``, ...), with linearly decaying drop-path rates."""
    if not len(planes) == len(depths) == len(strides):
        raise ValueError("planes, depths and strides need one entry per stage")
    rates = drop_path_rates(drop_path_rate, depths)
    stages, channels, reduction = [], in_channels, in_reduction
    for i, (width, depth, stride) in enumerate(zip(planes, depths, strides)):
        stage, info = make_stage(f"layer{i + 1}", block, channels, width, depth, stride=stride,
                                 in_reduction=reduction, shortcut=shortcut, drop_path_rates=rates[i],
                                 **block_kwargs)
        stages.append((stage, info))
        channels, reduction = info.channels, info.reduction
    return stages
