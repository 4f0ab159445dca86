"""ResNeXt of Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks".

A bottleneck whose 3x3 conv is split into ``cardinality`` groups (Fig. 3c, the grouped-convolution form,
equivalent to aggregating C parallel paths). Both builders reuse ``Bottleneck``: its ``groups`` and
``base_width`` give the template's width, ``int(planes * base_width / 64) * groups``.

- ``resnext29_8x64d`` (§5.3, Table 7): 3x3 stem with 64 filters, three stages of 3 blocks on 32/16/8 maps,
  cardinality 8 with 64 channels per group in the first stage (doubling per stage), outputs 256/512/1024;
  34.4M parameters.
- ``resnext50_32x4d`` (Table 1): the ResNet-50 layout with 32 groups of width 4; torchvision's keys and
  parameter count (25,028,904).
"""
from __future__ import annotations

from .blocks import Bottleneck, ConvNormAct, StagedNet, init_weights, make_stages
from .registry import register_model
from .resnet import ResNet


@register_model(paper="Xie et al. 2017, Table 7", input_size=(3, 32, 32), num_classes=10, tags=("cifar", "resnext"))
def resnext29_8x64d(num_classes: int = 10, in_chans: int = 3, *, drop_path_rate: float = 0.0,
                    zero_init_residual: bool = False) -> StagedNet:
    """ResNeXt-29 (8x64d): 34.4M params, 3.65% CIFAR-10 error (Table 7)."""
    stages = make_stages(Bottleneck, 64, (64, 128, 256), (3, 3, 3), (1, 2, 2), in_reduction=1, shortcut="B",
                         drop_path_rate=drop_path_rate, groups=8, base_width=64)
    model = StagedNet(ConvNormAct(in_chans, 64, 3), stages, num_classes=num_classes)
    init_weights(model, zero_init_residual)
    return model


@register_model(paper="Xie et al. 2017, Table 1", input_size=(3, 224, 224), num_classes=1000,
                tags=("imagenet", "resnext"))
def resnext50_32x4d(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNeXt-50 (32x4d): 25.0M params, 4.2 GFLOPs (Table 1); torchvision's keys."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, groups=32,
                  width_per_group=4, **kwargs)
