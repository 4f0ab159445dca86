"""The one interface every reslab model offers, so evaluation, fine-tuning and export never special-case one.

A model is a stem, a list of stages and a head (global pool + classifier ``fc``):
- ``forward_features(x)``: the last feature map, shape (B, num_features, h, w);
- ``forward_head(x, pre_logits=False)``: pool (+ ``fc`` unless ``pre_logits``);
- ``forward(x, pre_logits=False)``: both, so wrappers that act in ``forward`` (DistributedDataParallel's gradient
  hooks) also see a forward that stops at the pooled embedding;
- ``reset_classifier(num_classes)``: a fresh ``fc`` for a new class count;
- ``stage_info``: one ``StageInfo`` per stage (module name, output channels, cumulative stride).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StageInfo:
    name: str  # attribute path of the stage module, e.g. "layer2"
    channels: int  # output channels of the stage
    reduction: int  # total stride from the input to this stage's output


class ClassifierNet(nn.Module):
    """Base class: subclasses define ``forward_features`` and set ``fc``, ``num_features``, ``stage_info``."""

    num_features: int
    stage_info: list[StageInfo]
    fc: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=pre_logits)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0
