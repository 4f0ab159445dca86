"""INT8 with PyTorch's own kernels: FX graph-mode static quantization, frozen to a TorchScript file.

The second runtime of ``reslab quantize`` (``--runtime pytorch``). Same scheme as the ONNX Runtime path
(:mod:`reslab.deploy.quantize`): int8 symmetric per-channel weights of the BN-folded convs, uint8 asymmetric
per-tensor activations with min/max ranges from calibration images (Jacob et al. 2018, §3), but run by
PyTorch's ``x86`` quantized engine (oneDNN/FBGEMM, which use AVX-512 VNNI or AMX-INT8 where the CPU has
them). Conv+ReLU and the residual add+ReLU are fused into single quantized ops, and ``torch.jit.freeze``
removes the per-layer Python dispatch, which is what small networks such as the CIFAR ResNet-20 are bound by.

Why FX graph mode and not PT2E: in torch 2.14 the PT2E ``X86InductorQuantizer`` lives in the separate
``torchao`` package, which (0.18) fails to annotate residual blocks ("Input partition has more than one
output node", docs/deploy.md), and its speed comes from Inductor compilation. FX graph mode ships with
torch, needs no compiler, and its result is one ``.pt`` file that ``torch.jit.load`` reads without reslab.
The input stays float32 NCHW (the card's contract); the file quantizes it and switches to channels_last
(NHWC, the layout the int8 convolutions run natively) itself.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

ENGINE = "x86"


class _Logits(nn.Module):
    """``model(x)`` with the input moved to channels_last: a plain forward FX can trace (reslab models take
    keyword options such as ``pre_logits`` that symbolic tracing cannot branch on)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _qconfig_mapping(reduce_range: bool):
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                          reduce_range=reduce_range)
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def quantize_torch(model: nn.Module, calibration: Iterable[torch.Tensor], *,
                   reduce_range: bool = False) -> torch.jit.ScriptModule:
    """Static int8 ``model`` for PyTorch's ``x86`` engine, calibrated on ``calibration`` (normalised float32
    NCHW batches), traced and frozen. ``reduce_range``: 7-bit activations, which keep FBGEMM's 16-bit
    accumulation (CPUs without VNNI) from saturating."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calibration = list(calibration)
    if not calibration:
        raise ValueError("PyTorch int8 quantization needs at least one calibration batch")
    torch.backends.quantized.engine = ENGINE
    net = _Logits(copy.deepcopy(model).cpu().float().eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX graph mode's deprecation notice
        try:
            prepared = prepare_fx(net, _qconfig_mapping(reduce_range), (calibration[0][:1],))
        except Exception as e:  # control flow on tensors, unsupported ops
            raise ValueError(f"{type(model).__name__} cannot be traced for PyTorch int8 quantization ({e}); "
                             f"use --runtime onnxruntime") from e
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        quantized = convert_fx(prepared)
        with torch.inference_mode():
            return torch.jit.freeze(torch.jit.trace(quantized, calibration[0], check_trace=False).eval())


def save_torch_int8(module: torch.jit.ScriptModule, path: str | Path) -> Path:
    """Write the frozen int8 module atomically (a crash never leaves a half-written ``.pt``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; the format stays readable
        torch.jit.save(module, str(tmp))
    tmp.replace(path)
    return path


def load_torch_int8(path: str | Path) -> torch.jit.ScriptModule:
    """Read a file written by :func:`save_torch_int8`, with the quantized engine it was made for."""
    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path)).eval()


def torch_int8_logits(module: torch.jit.ScriptModule, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    torch.backends.quantized.engine = ENGINE
    with torch.inference_mode():
        return torch.cat([module(x.float()) for x in batches])
