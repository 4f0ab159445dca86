"""Pre-activation ResNets of He et al. 2016b, "Identity Mappings in Deep Residual Networks".

Each block is BN-ReLU-conv (Fig. 4e): the sum is left unactivated, so the shortcut carries the signal
unchanged through the whole network (Eq. 4), and a final BN-ReLU precedes pooling. CIFAR nets keep the
§4.2 layout of He et al. 2016 (3x3 stem with 16 filters, three stages on 32/16/8 maps), with basic blocks
(``preact_resnet20`` ... ``110``, 6n+2 layers) or bottlenecks (``preact_resnet164``/``1001``, 9n+2 layers,
Table 3: 1.7M and 10.2M parameters; the paper counts conv/fc weights, BN adds 0.13M to ResNet-1001).
ImageNet nets use the Table 1 layout of He et al. 2016.

Shortcuts default to option B (1x1 projection where shapes change), as in the paper's released code;
projections have no BN and see the pre-activated input. Stems are a bare conv (+ max pool on ImageNet):
the first block normalises its own input, so a BN-ReLU in the stem would be applied twice.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from .blocks import (PreActBasicBlock, PreActBottleneck, ResidualBlock, StagedNet, conv3x3, init_weights,
                     make_stages, norm_act)
from .registry import register_model

_PAPER_CIFAR = "He et al. 2016b, §4 / Table 3"
_PAPER_IMAGENET = "He et al. 2016b, §5 (Table 1 layout of He et al. 2016)"


def preact_resnet_cifar(block: type[ResidualBlock], depths: Sequence[int], widths: Sequence[int] = (16, 32, 64), *,
                        num_classes: int = 10, in_chans: int = 3, stem_channels: int = 16, shortcut: str = "B",
                        drop_path_rate: float = 0.0, zero_init_residual: bool = False, **block_kwargs) -> StagedNet:
    """CIFAR pre-activation network: 3x3 stem, stages at strides 1/2/2, final BN-ReLU (also the wide ResNets)."""
    stages = make_stages(block, stem_channels, widths, depths, (1, 2, 2), in_reduction=1, shortcut=shortcut,
                         drop_path_rate=drop_path_rate, **block_kwargs)
    model = StagedNet(nn.Sequential(conv3x3(in_chans, stem_channels)), stages, num_classes=num_classes,
                      final_norm=norm_act(stages[-1][1].channels))
    init_weights(model, zero_init_residual)
    return model


def preact_resnet_imagenet(block: type[ResidualBlock], depths: Sequence[int], *, num_classes: int = 1000,
                           in_chans: int = 3, shortcut: str = "B", drop_path_rate: float = 0.0,
                           zero_init_residual: bool = False, **block_kwargs) -> StagedNet:
    """ImageNet pre-activation network: 7x7/2 conv and 3x3/2 max pool, four stages, final BN-ReLU."""
    stem = nn.Sequential(nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    stages = make_stages(block, 64, (64, 128, 256, 512), depths, (1, 2, 2, 2), in_reduction=4, shortcut=shortcut,
                         drop_path_rate=drop_path_rate, **block_kwargs)
    model = StagedNet(stem, stages, num_classes=num_classes, final_norm=norm_act(stages[-1][1].channels))
    init_weights(model, zero_init_residual)
    return model


def _basic(n: int, num_classes: int, in_chans: int, **kwargs) -> StagedNet:
    return preact_resnet_cifar(PreActBasicBlock, [n, n, n], num_classes=num_classes, in_chans=in_chans, **kwargs)


def _bottleneck(n: int, num_classes: int, in_chans: int, **kwargs) -> StagedNet:
    return preact_resnet_cifar(PreActBottleneck, [n, n, n], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet20(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-20 (n=3 basic blocks per stage)."""
    return _basic(3, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet32(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-32 (n=5)."""
    return _basic(5, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet44(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-44 (n=7)."""
    return _basic(7, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet56(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-56 (n=9)."""
    return _basic(9, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet110(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-110 (n=18), the network of the paper's Table 2 ablations."""
    return _basic(18, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet164(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-164 (n=18 bottlenecks): 1.7M params (Table 3)."""
    return _bottleneck(18, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_CIFAR, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "preact"))
def preact_resnet1001(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-1001 (n=111 bottlenecks): 10.2M conv weights (Table 3); 10.33M with BN parameters."""
    return _bottleneck(111, num_classes, in_chans, **kwargs)


@register_model(paper=_PAPER_IMAGENET, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "preact"))
def preact_resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-18: the ResNet-18 layout of He et al. 2016, Table 1, with pre-activation blocks."""
    return preact_resnet_imagenet(PreActBasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans,
                                  **kwargs)


@register_model(paper=_PAPER_IMAGENET, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "preact"))
def preact_resnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> StagedNet:
    """Pre-act ResNet-50: the ResNet-50 layout with pre-activation bottlenecks."""
    return preact_resnet_imagenet(PreActBottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans,
                                  **kwargs)
