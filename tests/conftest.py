"""Shared test helpers."""
from __future__ import annotations

from pathlib import Path


def train_quick_digits(out: Path, epochs: int = 4, **overrides) -> Path:
    """A resnet20 trained with the default `quick` recipe (16x16 digits) for a few epochs: ~97 % test top-1 in
    a few seconds, so tests that compare two versions of one model (int8 vs fp32, pruned vs eval) are not
    decided by the near-ties of an untrained net. fp32, NCHW: the figures compared are fp32 ones."""
    from reslab.train import train
    from reslab.train.config import resolve_config

    cfg = resolve_config({"epochs": epochs, "out": str(out), "progress": False, "amp": "off",
                          "channels_last": False, **overrides}, recipe="quick")
    train(cfg)
    return out
