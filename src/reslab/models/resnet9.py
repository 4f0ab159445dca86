"""ResNet-9 of Page 2018, "How to train your ResNet" (Myrtle.ai's DAWNBench CIFAR-10 entry): a residual net
built for few epochs and wide, hardware-friendly convolutions rather than depth.

    stem    conv 3x3, 64                                   32x32
    layer1  conv 3x3, 128 -> max-pool 2 -> residual block   16x16   (block: two 3x3 convs, 128)
    layer2  conv 3x3, 256 -> max-pool 2                     8x8
    layer3  conv 3x3, 512 -> max-pool 2 -> residual block   4x4     (block: two 3x3 convs, 512)
    head    global pool -> fc (Page: global max-pool, then logits x 0.125)

Every conv is followed by BN and ReLU. The residual blocks are the library's ``BasicBlock`` (He et al. 2016,
Fig. 5 left; ReLU after the sum, where Page's blocks end in ReLU before it). 6.57M parameters and 0.38 GMACs
per 32x32 image at ``width=1``; ``width`` scales every layer (0.5: 1.64M parameters, 0.10 GMACs).
``stem="whiten"`` replaces the stem conv by a frozen 2x2 patch-whitening layer (24 filters for RGB, then ReLU;
Jordan 2024, airbench §3.2; ``reslab.models.whitening``), fitted on training images before the first step:
the trick that lets airbench's nets learn from the first iterations.
Its 128-512-channel convolutions fill a CPU's AMX/VNNI tiles far better than the 16-64 channels of He et
al.'s CIFAR ResNets, which is why the ``fast`` time-to-accuracy recipe uses it (docs/performance.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .base import StageInfo
from .blocks import BasicBlock, ConvNormAct, StagedNet, dirac_init, init_weights
from .registry import register_model
from .whitening import PatchWhitening

STEMS = ("conv", "whiten")
HEAD_POOLS = ("avg", "max")


def _downsample_stage(in_channels: int, out_channels: int, residual: bool, pool_first: bool) -> nn.Sequential:
    """Page's "layer": conv-BN-ReLU widening the channels, 2x2 max-pool, then optionally one residual block.

    ``pool_first`` pools straight after the conv (conv-pool-BN-ReLU, the block order of airbench's network,
    Jordan 2024): the same function up to BN statistics (max-pool commutes with a per-channel increasing map),
    with BN and ReLU on a quarter of the activations; on a CPU those are memory-bound, about a third of the
    3/8-width net's bf16 training step in torch.profiler, and the step gets 1.24x faster (docs/performance.md)."""
    if pool_first:
        layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    else:
        layers = [ConvNormAct(in_channels, out_channels), nn.MaxPool2d(2)]
    if residual:
        layers.append(BasicBlock(out_channels, out_channels))
    return nn.Sequential(*layers)


class ResNet9(StagedNet):
    """Page's ResNet-9 (see the module docstring); ``width`` multiplies the 64/128/256/512 channels, or
    ``widths`` gives the four explicitly (the stem's is ignored with ``stem="whiten"``); ``pool_first``: see
    ``_downsample_stage``; ``identity_init``: Dirac-initialised 3x3 convs (``blocks.dirac_init``, airbench);
    ``head_pool="max"`` and ``logit_scale=0.125``: Page's head (global max-pool; the logits scaled down by a
    constant, which with label smoothing keeps the softmax from saturating early; airbench uses 1/9)."""

    def __init__(self, *, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, stem: str = "conv",
                 widths: Sequence[int] | None = None, pool_first: bool = False, zero_init_residual: bool = False,
                 identity_init: bool = False, head_pool: str = "avg", logit_scale: float = 1.0):
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool must be one of {', '.join(HEAD_POOLS)}, got {head_pool!r}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
        if widths is None:
            widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        elif len(widths) != 4 or not all(isinstance(c, int) and c > 0 for c in widths):
            raise ValueError(f"widths must be 4 positive integers (stem, layer1, layer2, layer3), got {widths!r}")
        c0, c1, c2, c3 = widths
        if stem == "whiten":
            whitening = PatchWhitening(in_chans, kernel_size=2)
            stem_module, c0 = nn.Sequential(whitening, nn.ReLU(inplace=True)), whitening.out_channels
        else:
            stem_module = ConvNormAct(in_chans, c0)
        stages = [(_downsample_stage(c0, c1, True, pool_first), StageInfo("layer1", c1, 2)),
                  (_downsample_stage(c1, c2, False, pool_first), StageInfo("layer2", c2, 4)),
                  (_downsample_stage(c2, c3, True, pool_first), StageInfo("layer3", c3, 8))]
        super().__init__(stem_module, stages, num_classes=num_classes)
        self.head_pool, self.logit_scale = head_pool, logit_scale
        init_weights(self, zero_init_residual)
        if identity_init:
            dirac_init(self)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_pool == "max":
            return torch.flatten(nn.functional.adaptive_max_pool2d(x, 1), 1)
        return super().pool(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = super().forward_head(x, pre_logits)
        return x if pre_logits or self.logit_scale == 1.0 else x * self.logit_scale


@register_model(paper="Page 2018, How to train your ResNet (DAWNBench)", input_size=(3, 32, 32), num_classes=10,
                tags=("cifar", "resnet", "fast"))
def resnet9(num_classes: int = 10, in_chans: int = 3, **kwargs) -> ResNet9:
    """ResNet-9 (Page 2018): 6.57M params at width 1; 94% CIFAR-10 in 24 epochs on a V100 per its author."""
    return ResNet9(num_classes=num_classes, in_chans=in_chans, **kwargs)
