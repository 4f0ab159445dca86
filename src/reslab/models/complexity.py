"""Model complexity: parameter count and multiply-accumulates (MACs) of one image's forward pass.

The paper's "FLOPs" (He et al. 2016, Table 1: 3.6 G for ResNet-34, 11.3 G for ResNet-152) are
multiply-adds, so ``count_macs`` is the comparable number. Only Conv2d (grouped included) and Linear
are counted; BatchNorm, ReLU, pooling and residual additions are ignored, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import create_model, model_entry


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    # each output element needs (in_channels / groups) * kh * kw multiply-adds
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-adds of one forward pass on a single (C, H, W) image, counted with forward hooks."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += _conv_macs(module, output) if isinstance(module, nn.Conv2d) else _linear_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        model.eval()  # eval: BN statistics stay untouched and stochastic depth keeps every branch
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def model_summary(name: str) -> dict:
    """Name, parameter count, MACs at the native input size, paper and input size of a registered model."""
    entry = model_entry(name)
    model = create_model(name)
    return {
        "name": name,
        "params": count_params(model),
        "macs": count_macs(model, entry.input_size),
        "paper": entry.paper,
        "input_size": entry.input_size,
    }
