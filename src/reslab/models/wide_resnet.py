"""Wide residual networks of Zagoruyko & Komodakis 2016, "Wide Residual Networks".

CIFAR WRN-d-k (Table 1): a 3x3 stem with 16 filters, then three stages of n = (d - 4) / 6 pre-activation
basic blocks with 16k, 32k and 64k filters (B(3,3) in §2.1), a final BN-ReLU, pooling and fc. Every
stage opens with a 1x1 projection (the first too, 16 -> 16k); ``dropout`` sits between the two convs
(§2.4; the paper uses 0.3). Parameter counts at 10 classes match the paper's tables: WRN-16-4 2.7M,
WRN-28-10 36.5M, WRN-40-4 8.9M.

``wide_resnet50_2`` is the ImageNet variant as torchvision defines it: ResNet-50 with the bottleneck's
3x3 width doubled (``width_per_group=128``); it shares torchvision's keys and parameter count exactly.
"""
from __future__ import annotations

from .blocks import Bottleneck, PreActBasicBlock, StagedNet
from .preact_resnet import preact_resnet_cifar
from .registry import register_model
from .resnet import ResNet

_PAPER = "Zagoruyko & Komodakis 2016, Tables 1 and 4"


def wide_resnet_cifar(depth: int, widen_factor: int, *, num_classes: int = 10, in_chans: int = 3,
                      dropout: float = 0.0, **kwargs) -> StagedNet:
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (Table 1)."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n, k = (depth - 4) // 6, widen_factor
    return preact_resnet_cifar(PreActBasicBlock, [n, n, n], (16 * k, 32 * k, 64 * k), num_classes=num_classes,
                               in_chans=in_chans, dropout=dropout, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "wide", "preact"))
def wrn16_4(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """WRN-16-4 (n=2, k=4): 2.7M params."""
    return wide_resnet_cifar(16, 4, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "wide", "preact"))
def wrn28_10(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """WRN-28-10 (n=4, k=10): 36.5M params; the paper's best CIFAR model, usually trained with dropout 0.3."""
    return wide_resnet_cifar(28, 10, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER, input_size=(3, 32, 32), num_classes=10, tags=("cifar", "wide", "preact"))
def wrn40_4(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """WRN-40-4 (n=6, k=4): 8.9M params."""
    return wide_resnet_cifar(40, 4, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper="Zagoruyko & Komodakis 2016; torchvision layout", input_size=(3, 224, 224),
                num_classes=1000, tags=("imagenet", "wide", "resnet"))
def wide_resnet50_2(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """Wide ResNet-50-2: 68.9M params; torchvision's keys, so its state_dict loads with strict=True."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, width_per_group=64 * 2,
                  **kwargs)
