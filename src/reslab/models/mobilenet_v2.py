"""MobileNetV2 of Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks".

Table 2: a 3x3/2 conv with 32 filters, seven rows of inverted residual blocks (t = expansion, c = output
channels, n = repeats, s = stride of the first), a 1x1 conv to 1280 channels, pooling and the classifier.
``width_mult`` scales every layer's channels (§4, rounded to multiples of 8); the last conv never shrinks
below 1280.

Torchvision key compatibility comes first, so a torchvision state_dict loads with ``load_state_dict``
directly: the body is one flat ``features`` Sequential (``features.0`` stem ... ``features.18`` head conv)
and the head is ``classifier = Sequential(Dropout(0.2), Linear)``. The ClassifierNet interface maps onto it:
- ``fc`` is a read-only alias of ``classifier[1]``; replace the classifier with ``reset_classifier``
  (assigning ``model.fc = ...`` would register a new, unused module);
- ``stage_info`` names the module whose output is each row's output (``features.1``, ``features.3``, ...,
  ``features.18`` for the 1280-channel head conv), not a container of the row's blocks, because the flat
  torchvision layout has none; ``reslab.models.diagram`` groups blocks by execution order, so it needs none.

``mobilenet_v2_cifar`` adapts the net to 32x32 inputs as is common for CIFAR (not in the paper): the stem
and the first stride-2 row (c=24) use stride 1, so the total stride is 8 and the last maps are 4x4 rather
than 1x1; all weights keep their ImageNet shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ClassifierNet, StageInfo
from .blocks import ConvNormAct, InvertedResidual, ResidualBlock, drop_path_rates
from .registry import register_model

# Table 2 rows after the stem: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never more than 10% below ``value``
    (the rounding of the reference implementation, so width-multiplied nets match torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(ClassifierNet):
    """MobileNetV2 (Table 2) with torchvision's module names; see the module docstring for the interface."""

    def __init__(self, *, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 stem_stride: int = 2, row_strides: list[int] | None = None, dropout: float = 0.2,
                 drop_path_rate: float = 0.0, zero_init_residual: bool = False):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        strides = row_strides or [s for *_, s in INVERTED_RESIDUAL_SETTING]
        if len(strides) != len(INVERTED_RESIDUAL_SETTING):
            raise ValueError(f"row_strides needs {len(INVERTED_RESIDUAL_SETTING)} entries, got {len(strides)}")
        channels = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvNormAct(in_chans, channels, 3, stem_stride, activation=nn.ReLU6)]
        reduction = stem_stride
        self.stage_info = []
        rates = drop_path_rates(drop_path_rate, [n for _, _, n, _ in INVERTED_RESIDUAL_SETTING])
        for row, ((t, c, n, _), stride) in enumerate(zip(INVERTED_RESIDUAL_SETTING, strides)):
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, t,
                                               drop_path_rate=rates[row][i]))
                channels = out_channels
            reduction *= stride
            self.stage_info.append(StageInfo(f"features.{len(layers) - 1}", channels, reduction))
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        layers.append(ConvNormAct(channels, self.num_features, 1, activation=nn.ReLU6))
        self.stage_info.append(StageInfo(f"features.{len(layers) - 1}", self.num_features, reduction))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Identity())

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # blocks with a shortcut start as the identity (Goyal et al. 2017, §5.1)
            for m in self.modules():
                if isinstance(m, ResidualBlock) and m.use_shortcut:
                    m.zero_init_last()
        self.reset_classifier(num_classes)

    @property
    def fc(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.classifier[1] = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.classifier(x)  # dropout, then the linear layer


_PAPER = "Sandler et al. 2018, Table 2"


@register_model(paper=_PAPER, input_size=(3, 224, 224), num_classes=1000, tags=("imagenet", "mobilenet"))
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> MobileNetV2:
    """MobileNetV2 1.0: 3.4M params and 300M multiply-adds in Table 4 (3,504,872 params as torchvision)."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model(paper=_PAPER + " (CIFAR strides)", input_size=(3, 32, 32), num_classes=10,
                tags=("cifar", "mobilenet"))
def mobilenet_v2_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs) -> MobileNetV2:
    """MobileNetV2 for 32x32: stride-1 stem and first stride-2 row, total stride 8 (see module docstring)."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, stem_stride=1,
                       row_strides=[1, 1, 2, 2, 1, 2, 1], **kwargs)
