"""Model registry: ``create_model`` / ``list_models`` by name, as in timm, without its option sprawl.

Each architecture family module registers one small builder per paper variant with ``@register_model``.
Builders take ``num_classes`` and ``in_chans`` plus family-specific keyword arguments.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about a name before the model is built."""

    name: str
    builder: Callable[..., nn.Module]
    paper: str  # short citation, e.g. "He et al. 2016, Table 6"
    input_size: tuple[int, int, int]  # native (C, H, W) for MACs and export
    num_classes: int  # default class count (10 for CIFAR models, 1000 for ImageNet models)
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(*, paper: str, input_size=(3, 32, 32), num_classes: int = 10, tags=()):
    """Decorator registering a builder under its function name. Duplicate names raise."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, paper, tuple(input_size), num_classes, tuple(tags))
        return fn

    return wrap


def _ensure_loaded() -> None:
    # Importing the package imports every family module, which fills the registry.
    import reslab.models  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"resnet*"``), sorted naturally."""
    _ensure_loaded()
    names = [n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)]
    return sorted(names, key=_natural_key)


def model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name[:4]}*")[:5]
        hint = f" Did you mean one of: {', '.join(sorted(close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Run `reslab models` to list them all.")
    return _REGISTRY[name]


def create_model(name: str, *, num_classes: int | None = None, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered model by name.

    ``num_classes`` defaults to the architecture's native class count (10 for CIFAR nets,
    1000 for ImageNet nets). Extra keyword arguments go to the family builder
    (e.g. ``shortcut="B"``, ``zero_init_residual=True``).
    """
    entry = model_entry(name)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    model = entry.builder(num_classes=num_classes or entry.num_classes, in_chans=in_chans, **kwargs)
    model.model_name = name
    return model


def _natural_key(s: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
