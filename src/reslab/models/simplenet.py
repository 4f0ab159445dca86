"""SimpleNet of Hasanpour et al. 2016, "Lets keep it simple, Using simple architectures to outperform deeper
and more complex architectures".

A plain 13-layer network (the authors' CIFAR-10 model and reference code, 5.48M parameters):
3x3 convs with BN-ReLU, max pooling and light dropout, two 1x1 convs near the end, global pooling and one
fc. No shortcuts anywhere, so it is the strong plain baseline against which residual nets of a similar
budget can be compared. Stages here are the runs of layers between poolings (32, 16, 8, 4, 2, 1 maps on
CIFAR); each later stage starts with the 2x2 max pool and dropout of the authors' code.

The reference code gives every conv a bias although BN follows; these convs have none (the BN shift makes
it redundant): 4,544 fewer parameters for the same function. The paper's 5.48M counts conv weights only
(5,482,176); with BN and the fc the total is 5,493,834.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from .base import StageInfo
from .blocks import ConvNormAct, StagedNet, init_weights
from .registry import register_model

# One list per stage: conv output channels, "1x1:" marking the two pointwise convs. 13 convs in all.
_BN = partial(nn.BatchNorm2d, momentum=0.05)  # the reference code's BN momentum
SIMPLENET_STAGES = [[64, 128, 128, 128], [128, 128, 256], [256, 256], [512], ["1x1:2048", "1x1:256"], [256]]


def simplenet_body(*, num_classes: int = 10, in_chans: int = 3, dropout: float = 0.1) -> StagedNet:
    """SimpleNet's 13 conv layers grouped by resolution; every stage after the first opens with a pool."""
    stages, channels, reduction = [], in_chans, 1
    stem = nn.Identity()  # the first conv belongs to stage 1: all stages are the paper's plain layers
    for i, widths in enumerate(SIMPLENET_STAGES):
        layers: list[nn.Module] = []
        if i > 0:
            layers += [nn.MaxPool2d(2, stride=2), nn.Dropout2d(dropout)]
            reduction *= 2
        for width in widths:
            pointwise = isinstance(width, str)
            out = int(width.split(":")[1]) if pointwise else width
            layers.append(ConvNormAct(channels, out, 1 if pointwise else 3, norm_layer=_BN))
            channels = out
        stages.append((nn.Sequential(*layers), StageInfo(f"layer{i + 1}", channels, reduction)))
    model = StagedNet(stem, stages, num_classes=num_classes)
    init_weights(model)
    return model


@register_model(paper="Hasanpour et al. 2016 (CIFAR-10 model)", input_size=(3, 32, 32), num_classes=10,
                tags=("cifar", "plain"))
def simplenet(num_classes: int = 10, in_chans: int = 3, **kwargs) -> StagedNet:
    """SimpleNet (13 conv layers + fc): 5.48M conv weights, the plain baseline of this zoo."""
    return simplenet_body(num_classes=num_classes, in_chans=in_chans, **kwargs)
