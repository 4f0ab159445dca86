"""Learning-rate schedules as pure functions of the iteration, so resuming needs only the step count."""
from __future__ import annotations

import math

from reslab.train.config import TrainConfig


def lr_multiplier(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at iteration ``step`` (0-based) of ``total_steps``.

    - ``step``: multiply by ``gamma`` at each milestone (He et al. 2016 §4.2: x0.1 at 32k and 48k of 64k).
    - ``cosine``: half-cosine from 1 to ``final_lr_fraction`` after warm-up (Loshchilov & Hutter 2017).
    - ``onecycle``: linear up during warm-up, then linear down to ``final_lr_fraction`` (a triangular cycle).
    - ``constant``: 1.
    Warm-up: ``warmup_lr`` given means a constant lr of that value for ``warmup_iters`` (He et al.'s
    resnet110 recipe), otherwise a linear ramp from 0.
    """
    if step < cfg.warmup_iters:
        if cfg.warmup_lr is not None:
            return cfg.warmup_lr / cfg.lr
        return (step + 1) / cfg.warmup_iters
    end = cfg.final_lr_fraction
    span = max(1, total_steps - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":
        return 1 - (1 - end) * progress
    return 1.0


def progressive_size(step: int, total_steps: int, sizes: list[int]) -> int | None:
    """Training image side at iteration ``step`` under progressive resizing (Howard & Gugger 2020, fastai;
    FFCV's ResNet recipes): the run is cut into ``len(sizes)`` equal phases by iterations and phase ``i``
    trains on images resized to ``sizes[i]``, so the cheap low-resolution steps come first and the last phase
    adapts the network (and its BN statistics) to the size it is tested at. ``None`` when ``sizes`` is empty."""
    if not sizes:
        return None
    return sizes[min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))]


def resolve_milestones(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Milestones in iterations, from ``milestones`` and ``milestone_epochs`` together."""
    return sorted(set(cfg.milestones) | {round(e * steps_per_epoch) for e in cfg.milestone_epochs})
